"""A tiered FP8 library: e4m3 slot pools with per-slot-row scale pools beside them, filled
from the CPU and disk tiers, give the all-resident FP8 library's attention (the same e4m3
values) at top_k = all under a budget of 2 slots; disk reads read only a chunk's rows and
scale rows."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from types import SimpleNamespace

import pytest
import torch

from moska.kernels.selections import from_topk
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref
from moska.library import build_library, load_library
from moska.library.fp8 import FP8_DTYPE
from moska.library.tiers import TierConfig

DOCS = [
    ("a.md", "# Alpha\nThe quick brown fox jumps over the lazy dog."),
    ("b.txt", "Bravo: pack my box with five dozen liquor jugs."),
]
CHUNK = 16
_CPU = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="compiled Triton reads CUDA tensors only"
)


@pytest.fixture(scope="module")
def fp8_root(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiers_fp8")
    kw = {"chunk_size": CHUNK, "prefill_tokens": 64, "progress": False}
    build_library(tiny_model, DOCS, "lib8", root, kv_dtype="fp8", **kw)
    full = load_library(root, "lib8", None, "cpu", progress=False)
    assert full.tiers is None and full.num_chunks >= 4
    return root, full


def _budget(full, slots: int) -> str:
    """GPU bytes for `slots` chunks per layer: e4m3 K and V plus fp32 k and v scales."""
    hkv, d = full.k_pools[0].shape[1:]
    return f"{slots * CHUNK * hkv * (2 * d + 8) * full.num_kv_layers}B"


@_CPU
@pytest.mark.parametrize("miss_policy", ["wait", "skip"])
def test_tiered_fp8_top_k_all_equals_all_resident(fp8_root, miss_policy):
    root, full = fp8_root
    cfg = TierConfig(gpu_budget=_budget(full, 2), cpu_budget="0", miss_policy=miss_policy)
    lib = load_library(root, "lib8", None, "cpu", progress=False, tiers=cfg)
    tiers = lib.tiers
    assert tiers is not None and tiers.num_slots == 2 < lib.num_chunks  # passes of 2 chunks
    assert lib.k_pools[0].dtype == FP8_DTYPE and lib.kv_scales(0) is not None
    ks, _ = lib.kv_scales(0)
    assert ks.shape == (2 * tiers.slot_rows, lib.k_pools[0].shape[1]) and ks.dtype == torch.float32
    # the Triton kernel (interpreted) on layer 0, the plain-PyTorch one on the others
    kernel = SimpleNamespace(grouped_shared=grouped_shared_attention)
    ref = SimpleNamespace(grouped_shared=grouped_shared_attention_ref)
    hkv, d = full.k_pools[0].shape[1:]
    c = full.num_chunks
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 2 * hkv, d, generator=g)
    sel = from_topk(torch.arange(c).expand(2, 1, c), hkv, c)  # top_k = all
    sm = d**-0.5
    for layer in range(full.num_kv_layers):
        # the exact case of both policies: wait (the default of "wait", forced under "skip")
        ops = kernel if layer == 0 else ref
        o, lse, kept = tiers.attend(ops, layer, q, sel, sm, wait=miss_policy == "skip" or None)
        assert kept.req.numel() == sel.req.numel()
        args = (full.k_pools[layer], full.v_pools[layer], full.chunk_offsets, sel, sm)
        o_all, lse_all = ops.grouped_shared(q, *args, kv_scales=full.kv_scales(layer))
        o_ref, lse_ref = grouped_shared_attention_ref(q, *args, kv_scales=full.kv_scales(layer))
        for want_o, want_l in ((o_all, lse_all), (o_ref, lse_ref)):
            assert ((o.float() - want_o.float()).norm() / want_o.float().norm()) < 1e-4
            assert ((lse - want_l).norm() / want_l.norm()) < 1e-4
    st = tiers.stats
    assert st.misses["gpu"] > 0 and tiers.cpu.disk.bytes_read > 0
    # bytes moved count the scale rows too: every load of all layers, rows x (2D + 8) bytes
    assert tiers.row_bytes == hkv * (2 * d + 8)
    assert st.bytes_in["gpu"] % tiers.row_bytes == 0 and st.bytes_in["gpu"] > 0
    if miss_policy == "skip":  # the skip path reads resident chunks with their scales
        o, _, kept = tiers.attend(ref, 0, q, sel, sm)
        assert 0 < kept.req.numel() < sel.req.numel()
        args = (full.k_pools[0], full.v_pools[0], full.chunk_offsets, kept, sm)
        o_ref, _ = grouped_shared_attention_ref(q, *args, kv_scales=full.kv_scales(0))
        assert ((o.float() - o_ref).norm() / o_ref.norm()) < 1e-4


def test_disk_reads_only_the_chunk_rows_and_scales(fp8_root, monkeypatch):
    from safetensors.torch import load_file

    from moska.library.chunk_store import DiskChunks
    from moska.library.format import layer_file, read_manifest

    root, _ = fp8_root
    directory = root / "lib8"
    manifest = read_manifest(directory)
    disk = DiskChunks(directory, manifest, keys=("k", "v", "k_scale", "v_scale"))
    calls = []
    real = os.preadv

    def spy(fd, buffers, offset):
        calls.append(sum(len(b) for b in buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", spy)
    offs, c = manifest.chunk_offsets, 2
    file = load_file(str(directory / layer_file(1)))
    for key in ("v", "k_scale"):
        want = file[key][offs[c] : offs[c + 1]]
        out = torch.empty_like(want)
        disk.read_rows(1, key, offs[c], offs[c + 1], out)
        assert out.view(torch.uint8).equal(want.view(torch.uint8))  # e4m3 has no ==
        assert calls[-1] == want.numel() * want.element_size()
    assert len(calls) == 2 and disk.bytes_read == sum(calls)
    disk.close()
