"""A built library's KV against plain transformers: the build runs the serving attention
path (``library/prefill.py``: the model's forward, ``PagedAttention``, the model's kernel
table), and each chunk's K (after RoPE) and V must equal what ``LlamaForCausalLM`` caches for
the same tokens at the same positions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moska.library import build_in_memory
from moska.library.positions import IndependentOptions
from moska.library.prefill import BuildLayout, compact_rows

DOCS = [
    ("a.md", "# Alpha\nThe quick brown fox jumps over the lazy dog. " * 2),
    ("b.txt", "Bravo: pack my box with five dozen liquor jugs."),
]


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    return model.eval()


def hf_kv(model, token_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k, v) [T, Hkv, D] that transformers caches for one sequence."""
    with torch.inference_mode():
        out = model(torch.tensor([token_ids]), use_cache=True)
    cache = out.past_key_values
    return [
        (layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)) for layer in cache.layers
    ]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_prefix_build_equals_transformers(tiny_model, hf_model):
    lib, _ = build_in_memory(
        tiny_model, DOCS, "p", chunk_size=16, prefill_tokens=23, progress=False
    )
    want = hf_kv(hf_model, lib.token_ids.tolist())
    for layer, (k, v) in enumerate(want):
        assert rel_err(lib.k_pools[layer], k) < 1e-4
        assert rel_err(lib.v_pools[layer], v) < 1e-4


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_independent_chunks_with_sink_equal_transformers(tiny_model, hf_model, kv_dtype):
    """Each chunk prefilled alone after the chunk sink (BOS), whose row is not stored."""
    lib, _ = build_in_memory(
        tiny_model,
        DOCS,
        "i",
        chunk_size=24,
        mode="independent",
        prefill_tokens=37,  # pieces cut chunks and pack several into one forward
        progress=False,
        independent=IndependentOptions(chunk_sink=True),
        kv_dtype=kv_dtype,
    )
    bos = tiny_model.tokenizer.bos_token_id
    offs = lib.chunk_offsets.tolist()
    assert len(lib.chunks) > 3
    for c in lib.chunks:
        want = hf_kv(hf_model, [bos] + lib.token_ids[offs[c.chunk] : offs[c.chunk + 1]].tolist())
        for layer, (k, v) in enumerate(want):
            got_k = lib.k_pools[layer][offs[c.chunk] : offs[c.chunk + 1]]
            got_v = lib.v_pools[layer][offs[c.chunk] : offs[c.chunk + 1]]
            if kv_dtype == "fp8":  # e4m3 with per-(token, head) scales: ~3 mantissa bits
                ks, vs = lib.kv_scale_pools[layer]
                got_k = got_k.float() * ks[offs[c.chunk] : offs[c.chunk + 1], :, None]
                got_v = got_v.float() * vs[offs[c.chunk] : offs[c.chunk + 1], :, None]
            tol = 1e-4 if kv_dtype == "auto" else 8e-2
            assert rel_err(got_k, k[1:]) < tol and rel_err(got_v, v[1:]) < tol


def test_build_runs_the_model_kernel_table(tiny_model, monkeypatch):
    """The prefill's attention is the table's paged prefill, fed serving-style metadata."""
    calls = []
    table = tiny_model.model.kernels
    real = table.paged_prefill

    def spy(q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, sm_scale):
        calls.append((q.shape[0], k_cache.shape[1], cu_q_lens.tolist(), seq_lens.tolist()))
        return real(q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, sm_scale)

    monkeypatch.setattr(tiny_model.model, "kernels", dataclasses.replace(table, paged_prefill=spy))
    lib, _ = build_in_memory(
        tiny_model, DOCS[1:], "s", chunk_size=16, mode="independent", prefill_tokens=20,
        progress=False, independent=IndependentOptions(chunk_sink=False),
    )  # fmt: skip
    layers = lib.num_layers
    assert calls and len(calls) % layers == 0
    assert sum(t for t, *_ in calls) == lib.num_tokens * layers  # every token once per layer
    for t, _, cu, seq_lens in calls:
        assert cu[0] == 0 and cu[-1] == t and all(0 < s <= 16 for s in seq_lens)


def test_layout_and_in_place_compaction():
    layout = BuildLayout.of([(0, 5), (5, 22), (22, 23)], block_size=4)
    assert layout.first_block == (0, 2, 7) and layout.num_blocks == 8
    keep = layout.kept_rows(1)  # each sequence's first row dropped
    assert keep.tolist() == [1, 2, 3, 4] + list(range(9, 25)) + []
    torch.manual_seed(0)
    flat = torch.randn(layout.num_blocks * 4, 2, 3)
    want = flat[keep].clone()
    got = compact_rows(flat, keep)
    assert got.data_ptr() == flat.data_ptr() and torch.equal(got, want)


def test_triton_table_build_equals_transformers(tiny_model, hf_model, monkeypatch):
    """The Triton paged prefill (the CUDA engine's) builds the same KV (interpreter; the
    table's other ops stay PyTorch to keep the test short)."""
    from moska.kernels.paged_attention import paged_prefill_attention

    table = dataclasses.replace(tiny_model.model.kernels, paged_prefill=paged_prefill_attention)
    monkeypatch.setattr(tiny_model.model, "kernels", table)
    lib, _ = build_in_memory(
        tiny_model, [("t", "pack my box with five dozen liquor jugs")], "t", chunk_size=16,
        mode="independent", prefill_tokens=24,
        progress=False, independent=IndependentOptions(chunk_sink=True),
    )  # fmt: skip
    bos = tiny_model.tokenizer.bos_token_id
    offs = lib.chunk_offsets.tolist()
    for c in range(lib.num_chunks):
        want = hf_kv(hf_model, [bos] + lib.token_ids[offs[c] : offs[c + 1]].tolist())
        for layer, (k, v) in enumerate(want):
            assert rel_err(lib.k_pools[layer][offs[c] : offs[c + 1]], k[1:]) < 1e-4
            assert rel_err(lib.v_pools[layer][offs[c] : offs[c + 1]], v[1:]) < 1e-4
