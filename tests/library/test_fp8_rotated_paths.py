"""Rotated FP8 libraries in tiers (exact at top_k = all under a 2-slot budget) and composed
with other libraries (served as their values), and how a user asks for one: `moska library build --kv-dtype fp8_rotated` end to end
(manifest, `library info`), the flag's and the HTTP field's validation."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_fp8_rotated import DOCS, KW  # the same two documents and build settings

from moska.attention.shared import fp8_kwargs
from moska.kernels.selections import from_topk
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref
from moska.library import build_library, load_library
from moska.library.tier_config import TierConfig

_CPU = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="compiled Triton reads CUDA tensors only"
)


@pytest.fixture(scope="module")
def libs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("rotpaths")
    ind = {**KW, "mode": "independent"}
    rot = build_library(tiny_model, DOCS, "rot", root, kv_dtype="fp8_rotated", **ind)
    return root, rot


def _bytes(slots: int, hkv: int = 2, d: int = 16, layers: int = 2) -> str:
    """GPU bytes for `slots` 16-row chunks per layer of the tiny model: e4m3 K and V plus
    fp32 scales."""
    return f"{slots * 16 * hkv * (2 * d + 8) * layers}B"


@_CPU
def test_tiered_rotated_top_k_all_equals_all_resident(libs):
    """Tiers (2 GPU slots, the rest read from disk): the slots' attention, q rotated at each
    launch, is the all-resident rotated library's at top_k = all, on the Triton kernel
    (interpreted, layer 0) and the PyTorch reference (the other layers); and both are the
    exact (unrotated) values' attention only with the rotation (the test can fail)."""
    root, _ = libs
    full = load_library(root, "rot", None, "cpu", progress=False)
    cfg = TierConfig(gpu_budget=_bytes(2), cpu_budget="0")
    lib = load_library(root, "rot", None, "cpu", progress=False, tiers=cfg)
    tiers = lib.tiers
    assert tiers is not None and tiers.num_slots == 2 < lib.num_chunks
    assert torch.equal(tiers.q_rotation, full.q_rotation) and lib.q_rotation is tiers.q_rotation
    kernel = SimpleNamespace(grouped_shared=grouped_shared_attention)
    ref = SimpleNamespace(grouped_shared=grouped_shared_attention_ref)
    hkv, d = full.k_pools[0].shape[1:]
    c, sm = full.num_chunks, d**-0.5
    q = torch.randn(2, 2 * hkv, d, generator=torch.Generator().manual_seed(5))
    sel = from_topk(torch.arange(c).expand(2, 1, c), hkv, c)  # top_k = all
    for layer in range(full.num_kv_layers):
        ops = kernel if layer == 0 else ref
        o, lse, kept = tiers.attend(ops, layer, q, sel, sm)
        assert kept.req.numel() == sel.req.numel()
        args = (full.k_pools[layer], full.v_pools[layer], full.chunk_offsets, sel, sm)
        o_ref, lse_ref = grouped_shared_attention_ref(q, *args, **fp8_kwargs(full, layer))
        assert ((o.float() - o_ref).norm() / o_ref.norm()) < 1e-4
        assert ((lse - lse_ref).norm() / lse_ref.norm()) < 1e-4
        unrotated, _ = grouped_shared_attention_ref(q, *args, kv_scales=full.kv_scales(layer))
        assert ((unrotated - o_ref).norm() / o_ref.norm()) > 1e-2
    assert tiers.stats.misses["gpu"] > 0 and tiers.cpu.disk.bytes_read > 0


def test_tensor_core_copy_of_tiers_carries_the_rotation(libs, monkeypatch):
    from moska.library import fp8_mma

    root, _ = libs
    cfg = TierConfig(gpu_budget=_bytes(4), cpu_budget="0")
    lib = load_library(root, "rot", None, "cpu", progress=False, tiers=cfg)
    t = fp8_mma.attach_tiered(lib, q_split=False)
    assert t.q_rotation is lib.q_rotation and t.v_block_rows == 0  # per-row scales read
    assert fp8_mma.mma_kwargs(lib.tiers, 0)["q_rotation"] is lib.q_rotation


def test_cli_builds_a_rotated_library(tiny_dir, tmp_path, capsys):
    from moska.cli import build_parser, main

    doc = tmp_path / "doc.txt"
    doc.write_text(DOCS[0][1])
    root = tmp_path / "libs"
    argv = ["library", "build", str(doc), "--name", "r", "--model", str(tiny_dir)]
    argv += ["--chunk-size", "16", "--library-root", str(root), "--device", "cpu"]
    argv += ["--dtype", "float32", "--kv-dtype", "fp8_rotated"]
    assert main(argv) == 0
    m = json.loads((root / "r" / "manifest.json").read_text())
    assert (m["kv_dtype"], m["fp8_format"]) == ("fp8", "rotated")
    capsys.readouterr()
    assert main(["library", "info", "r", "--library-root", str(root)]) == 0
    assert "fp8_format: rotated" in capsys.readouterr().out.splitlines()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["library", "build", "x", "--name", "n", "--kv-dtype", "fp8r"])
    assert "invalid choice: 'fp8r'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["library", "build", "--help"])
    assert "fp8_rotated = e4m3 with K Hadamard-rotated" in " ".join(capsys.readouterr().out.split())


def test_http_build_body_validates_and_carries_fp8_rotated():
    from fastapi.testclient import TestClient

    server_tests = str(Path(__file__).resolve().parents[1] / "server")
    sys.path.insert(0, server_tests)
    try:
        from fake_engine import FakeEngine, FakeLibraryManager
    finally:
        sys.path.remove(server_tests)

    from moska.server.app import create_app
    from moska.server.settings import ServerSettings

    seen = []

    class Spy(FakeLibraryManager):
        def tier_stats(self) -> dict:
            return {}

        def build(self, *args, **kwargs):
            seen.append(kwargs.get("kv_dtype", "auto"))
            return super().build(*args, **kwargs)

    app = create_app(FakeEngine(libraries=Spy(build_seconds=0.0)), ServerSettings())
    body = {"name": "hr", "documents": [{"name": "a", "text": "hello " * 20}], "chunk_size": 32}
    with TestClient(app) as c:
        for bad in ("fp8-rotated", "rotated", 8):
            r = c.post("/v1/libraries", json={**body, "kv_dtype": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "kv_dtype", r.text
        r = c.post("/v1/libraries", json={**body, "kv_dtype": "fp8_rotated"})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 10
        while (job := c.get(f"/v1/libraries/jobs/{r.json()['id']}").json())["status"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.02)
    assert job["status"] == "succeeded" and seen == ["fp8_rotated"]


def test_engine_composes_a_rotated_part_as_its_values(tiny_dir, tmp_path):
    """A composition of a rotated FP8 library and a per-token one computes what the same
    composition computes with the rotated part's values unrotated (dequantized K times R^T,
    V) in fp32, every chunk and routed: the rotated part's launch (a group of its own: FP8
    pools are never in the arena) rotates q, the others' do not."""
    from moska import LLM, SamplingParams
    from moska.library.fp8 import dequantize

    llm = LLM(
        str(tiny_dir), device="cpu", dtype="float32", attention="torch",
        num_kv_blocks=256, library_root=str(tmp_path),
    )  # fmt: skip
    libs = llm.engine.libraries
    for name, kv in (("ri", "fp8_rotated"), ("ti", "fp8"), ("vi", "auto")):
        libs.build(name, DOCS, chunk_size=16, mode="independent", kv_dtype=kv)
    ri, vi = libs.get("ri"), libs.get("vi")
    r = ri.q_rotation.double()
    with torch.no_grad():
        for i in range(ri.num_kv_layers):  # in place: vi's pools may be arena rows
            ks, vs = ri.kv_scales(i)
            k = dequantize((ri.k_pools[i], ks), ri.chunk_offsets, torch.float64)
            vi.k_pools[i].copy_(k @ r.T)  # R orthonormal: k R R^T = k
            vi.v_pools[i].copy_(dequantize((ri.v_pools[i], vs), ri.chunk_offsets))
    prompt = [[ord(c) for c in "The quick brown"]]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=5)
    for top_k in (10**6, 3):
        a, b = (
            llm.generate(prompt, params, libraries=[x, "ti"], top_k_chunks=top_k)[0].outputs[0]
            for x in ("vi", "ri")
        )
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.top.keys() == lb.top.keys()
            assert max(abs(la.top[t] - lb.top[t]) for t in la.top) < 1e-4


def test_a_head_dim_without_a_hadamard_matrix_is_refused_before_prefill():
    from moska.library.builder import build_from_corpus
    from moska.library.errors import LibraryError
    from moska.server.errors import APIError
    from moska.server.library_routes import _check_kv_dtype

    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2, head_dim=12))
    with pytest.raises(LibraryError, match="power-of-two head dim.*12"):
        build_from_corpus(model, None, "x", kv_dtype="fp8_rotated")  # no corpus read yet
    manager = SimpleNamespace(loaded_model=model)
    with pytest.raises(APIError) as e:
        _check_kv_dtype(manager, "fp8_rotated")
    assert e.value.status == 400 and e.value.param == "kv_dtype"
    _check_kv_dtype(manager, "fp8")  # per-token FP8 needs no power of two
    model.config.head_dim = 16
    _check_kv_dtype(manager, "fp8_rotated")
