"""Rotated block-scaled FP8 libraries (`--kv-dtype fp8_rotated`, library/fp8_rotated.py):
built through the real build path, saved and loaded (the manifest records the format, the
loader sets q_rotation); the pools equal the benchmark's construction; the grouped kernel
(interpreted, fp16) and its reference with the library's q rotation against dense attention
over the exact keys; the engine serving it as its values; the tensor-core attach."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses
import json

import pytest
import torch

from moska.attention.shared import fp8_kwargs
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref
from moska.library import build_in_memory, build_library, fp8, load_library, model_fingerprint
from moska.library.errors import CorruptLibraryError
from moska.library.format import Manifest, read_manifest
from moska.library.fp8 import FP8_DTYPE, dequantize, hadamard, quantize
from moska.library.fp8_rotated import ROTATION_SEED, is_rotated

DOCS = [
    ("a.md", "# Alpha\nThe quick brown fox jumps over the lazy dog. " * 3),
    ("b.txt", "Bravo: pack my box with five dozen liquor jugs. " * 2),
]
KW = {"chunk_size": 16, "prefill_tokens": 64, "progress": False}
_CPU = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only (TRITON_INTERPRET=1)"
)


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("rotlibs")
    info = build_library(tiny_model, DOCS, "rot", root, kv_dtype="fp8_rotated", **KW)
    assert info.kv_dtype == "fp8" and info.fp8_format == "rotated"
    exact, _ = build_in_memory(tiny_model, DOCS, "exact", **KW)
    lib = load_library(root, "rot", model_fingerprint(tiny_model), progress=False)
    return root, exact, lib


def test_manifest_records_the_format_and_round_trips(saved):
    root, _, _lib = saved
    m = read_manifest(root / "rot")
    assert (m.kv_dtype, m.fp8_format) == ("fp8", "rotated") and is_rotated(m)
    assert Manifest.from_json(m.to_json()) == m
    # a manifest written before the field reads as per-token FP8 (or plain)
    d = json.loads(m.to_json())
    del d["fp8_format"]
    old = Manifest.from_json(json.dumps(d))
    assert old.fp8_format == "token" and not is_rotated(old)
    for bad, match in (
        ({"fp8_format": "hadamard"}, "fp8_format"),
        ({"kv_dtype": "auto"}, "needs"),
    ):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(m, **bad)
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text(
        m.to_json().replace('"fp8_format": "rotated"', '"fp8_format": "rot"')
    )
    with pytest.raises(CorruptLibraryError, match="fp8_format"):
        read_manifest(root / "broken")


def test_loaded_pools_are_the_benchmarks_construction(saved):
    """K is quantize(k R, "block"), V quantize(v, "block") of the exact pools (what
    bench/fp8_decode.py's fp8_mma_rot_blk builds), R = hadamard(D, 0); the routing index is
    the exact keys'; q_rotation is R in the model's dtype."""
    _, exact, lib = saved
    d = lib.k_pools[0].shape[-1]
    rot = hadamard(d, ROTATION_SEED)
    assert lib.q_rotation is not None and lib.q_rotation.dtype == torch.float32
    assert torch.equal(lib.q_rotation, rot)
    offs = lib.chunk_offsets
    for layer in range(lib.num_kv_layers):
        ks, vs = lib.kv_scales(layer)
        kq = quantize(exact.k_pools[layer] @ rot, offs, "block")
        vq = quantize(exact.v_pools[layer], offs, "block")
        assert lib.k_pools[layer].dtype == FP8_DTYPE
        assert torch.equal(vs, vq.scale) and torch.equal(
            lib.v_pools[layer].view(torch.uint8), vq.data.view(torch.uint8)
        )
        torch.testing.assert_close(ks, kq.scale, rtol=1e-6, atol=0)
        y, ref = dequantize((lib.k_pools[layer], ks), offs), dequantize(kq, offs)
        # the same e4m3 values but where an fp32 ulp of k R moved a rounding: an e4m3 step
        m = (ref.abs() / ks[:, :, None]).clamp_min(2**-6)
        step = ks[:, :, None] * 2 ** (m.log2().floor() - 2)  # two steps of 2^-3 relative
        assert ((y - ref).abs() <= step).all()
        assert ((y - ref).abs() > 0).float().mean() < 0.01
        for a, b in zip(lib.routing[layer], exact.routing[layer]):
            assert torch.equal(a, b)  # routed with q unrotated, from the exact keys
    # K and V scales constant over each block of BLOCK_ROWS rows from a chunk's start
    starts = offs[:-1].long()
    for a, b in zip(starts.tolist(), offs[1:].tolist()):
        for r in range(a, b, fp8.BLOCK_ROWS):
            e = min(r + fp8.BLOCK_ROWS, b)
            for sc in lib.kv_scales(0):
                assert torch.equal(sc[r:e], sc[r : r + 1].expand(e - r, -1))


def _every(lib, b, device="cpu"):
    from moska.attention.shared import all_chunk_selections

    hkv = lib.k_pools[0].shape[1]
    return all_chunk_selections(b, hkv, lib.num_chunks, torch.device(device), False)


def _merge(o, lse, sel, b, hkv):
    """[B, Hq, D]: each (row, KV head)'s chunk states merged by their LSE (fp64)."""
    g, d = o.shape[1], o.shape[2]
    num = torch.zeros(b, hkv, g, d, dtype=torch.float64)
    den = torch.zeros(b, hkv, g, dtype=torch.float64)
    for i, (r, h) in enumerate(zip(sel.req.tolist(), sel.kv_head.tolist())):
        w = lse[i].double().exp()  # tiny model, small logits: no overflow
        num[r, h] += w[:, None] * o[i].double()
        den[r, h] += w
    return (num / den[..., None]).reshape(b, hkv * g, d)


def _dense(q, k, v, sc):
    """[B, Hq, D] attention of every row over all S keys (fp64)."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    qq = q.double().view(b, hkv, hq // hkv, d)
    s = torch.einsum("bhgd,shd->bhgs", qq, k.double()) * sc
    return torch.einsum("bhgs,shd->bhgd", s.softmax(-1), v.double()).reshape(b, hq, d)


@_CPU
def test_kernel_and_reference_with_q_rotation_match_dense_exact_attention(saved):
    """top-k = all: the grouped kernel (fp16, interpreted) and its PyTorch reference reading
    the rotated library with its fp8_kwargs, merged over chunks, equal dense attention over
    the exact (unrotated, unquantized) keys within e4m3's error; kernel and reference agree
    to fp16."""
    _, exact, lib = saved
    torch.manual_seed(3)
    b, hkv, d = 5, lib.k_pools[0].shape[1], lib.k_pools[0].shape[2]
    q = torch.randn(b, 2 * hkv, d)
    sel, sc = _every(lib, b), d**-0.5
    for layer in range(lib.num_kv_layers):
        kw = fp8_kwargs(lib, layer)
        assert kw["q_rotation"] is lib.q_rotation and "kv_scales" in kw
        ro, rl = grouped_shared_attention_ref(
            q, lib.k_pools[layer], lib.v_pools[layer], lib.chunk_offsets, sel, sc, **kw
        )
        kw16 = {**kw, "q_rotation": kw["q_rotation"].half()}
        o, lse = grouped_shared_attention(
            q.half(), lib.k_pools[layer], lib.v_pools[layer], lib.chunk_offsets, sel, sc,
            block_m=16, block_n=16, **kw16,
        )  # fmt: skip
        err = ((o.double() - ro.double()).norm() / ro.double().norm()).item()
        assert err < 1e-2 and ((lse - rl).abs() / rl.abs().clamp_min(1)).max() < 1e-2
        got = _merge(ro, rl, sel, b, hkv)
        want = _dense(q, exact.k_pools[layer], exact.v_pools[layer], sc)
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert 1e-6 < rel < 0.05  # e4m3: 2^-4 per element at worst, far less on average
        # without the rotation the same pools are a different attention: q_rotation is used
        bad = grouped_shared_attention_ref(
            q, lib.k_pools[layer], lib.v_pools[layer], lib.chunk_offsets, sel, sc,
            kv_scales=kw["kv_scales"],
        )[0]  # fmt: skip
        assert ((bad - ro).norm() / ro.norm()).item() > 10 * err


def test_reference_refuses_a_misshapen_rotation(saved):
    _, _, lib = saved
    d = lib.k_pools[0].shape[-1]
    q, sel = torch.randn(2, 4, d), _every(lib, 2)
    with pytest.raises(ValueError, match="q_rotation"):
        grouped_shared_attention_ref(
            q, lib.k_pools[0], lib.v_pools[0], lib.chunk_offsets, sel, 0.2,
            kv_scales=lib.kv_scales(0), q_rotation=torch.eye(d // 2),
        )  # fmt: skip


def test_engine_serves_rotated_library_as_its_values(tiny_dir, tmp_path):
    """The engine with a rotated library computes what it computes with a library holding
    its values unrotated (dequantized K times R^T, V) in fp32, all chunks and routed: q is
    rotated exactly once, in prefill and decode."""
    from moska import LLM, SamplingParams

    llm = LLM(
        str(tiny_dir), device="cpu", dtype="float32", attention="torch",
        num_kv_blocks=256, library_root=str(tmp_path),
    )  # fmt: skip
    libs = llm.engine.libraries
    libs.build("values", DOCS, chunk_size=16)
    libs.build("rot", DOCS, chunk_size=16, kv_dtype="fp8_rotated")
    rot, values = libs.get("rot"), libs.get("values")
    assert rot.q_rotation is not None and values.q_rotation is None
    r = rot.q_rotation.double()
    for i in range(rot.num_kv_layers):
        ks, vs = rot.kv_scales(i)
        k = dequantize((rot.k_pools[i], ks), rot.chunk_offsets, torch.float64)
        values.k_pools[i] = (k @ r.T).float()  # R orthonormal: k R R^T = k
        values.v_pools[i] = dequantize((rot.v_pools[i], vs), rot.chunk_offsets)
    prompt = [[ord(c) for c in "The quick brown"]]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=5)
    for top_k in (10**6, 2):
        a = llm.generate(prompt, params, library="values", top_k_chunks=top_k)[0].outputs[0]
        b = llm.generate(prompt, params, library="rot", top_k_chunks=top_k)[0].outputs[0]
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.top.keys() == lb.top.keys()
            assert max(abs(la.top[t] - lb.top[t]) for t in la.top) < 1e-4


def test_tensor_core_attach_reads_both_sides_per_block(saved, monkeypatch):
    """--fp8-attention mma on a rotated library: one K and one V scale per key block
    (block_sides 3) and q rotated at launch (the fields bench/fp8_decode.py set by hand).
    The program itself runs on Hopper only (tests/library/test_fp8_mma.py); here its
    keywords, with the device check lifted."""
    from moska.library import fp8_mma

    _, _, lib = saved
    lib = dataclasses.replace(lib, fp8_mma=None)
    monkeypatch.setattr(fp8_mma, "mma_unfit", lambda library: None)
    assert fp8_mma.attach_token_major_v(lib, "mma") is None
    t = lib.fp8_mma
    assert (t.block_sides, t.v_block_rows, t.q_split) == (3, fp8.BLOCK_ROWS, False)
    assert t.q_rotation is lib.q_rotation
    kw = fp8_mma.mma_kwargs(lib, 1)
    assert kw["q_rotation"] is lib.q_rotation and kw["fp8_scale_block"] == fp8.BLOCK_ROWS


@_CPU
def test_built_rotated_library_on_the_tensor_core_program_interpreted(saved, monkeypatch):
    """The built library, attached for --fp8-attention mma (device check lifted), read by
    the engine's one-library path on the FP8 tensor-core program (interpreted, fp16 q): the
    program's algorithm on the rotated q (fp8_mma_ref); without the rotation far off."""
    from types import SimpleNamespace

    from moska.attention.shared import shared_attention_for_group
    from moska.kernel_ops import kernel_ops
    from moska.kernels.shared_attention_fp8_ref import fp8_mma_ref, interpreter_e4m3
    from moska.library import fp8_mma

    _, _, lib = saved
    pools = {p: [t.clone() for t in getattr(lib, p)] for p in ("k_pools", "v_pools")}
    lib = dataclasses.replace(lib, fp8_mma=None, **pools)  # fresh: 16-byte aligned (TMA)
    monkeypatch.setattr(fp8_mma, "mma_unfit", lambda library: None)
    assert fp8_mma.attach_token_major_v(lib, "mma") is None
    hkv, d = lib.k_pools[0].shape[1:]
    q = torch.randn(3, 2 * hkv, d, generator=torch.Generator().manual_seed(2)).half()
    group = SimpleNamespace(single=lambda: lib, top_k=lib.num_chunks)
    o, lse, sel = shared_attention_for_group(kernel_ops("triton"), 1, q, group, d**-0.5)
    args = (lib.k_pools[1], lib.v_pools[1], lib.chunk_offsets, sel, d**-0.5, lib.kv_scales(1))
    qr = torch.matmul(q, lib.q_rotation.half())
    ao, al = fp8_mma_ref(qr, *args, fp8_mma.MMA_TILE["block_n"], False, interpreter_e4m3)

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    assert rel(o, ao) < 1e-3 and rel(lse, al) < 1e-4, (rel(o, ao), rel(lse, al))
    wrong, _ = fp8_mma_ref(q, *args, fp8_mma.MMA_TILE["block_n"], False, interpreter_e4m3)
    assert rel(o, wrong) > 10 * rel(o, ao)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
    reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0)",
)
def test_built_rotated_library_on_fp8_tensor_cores(tmp_path):
    """On Hopper: a rotated library built by the engine (the built-in model, D = 64, bf16),
    attached for --fp8-attention mma, read by the engine's one-library path on FP8 tensor
    cores (one-term q, q R at launch, one K and V scale per key block) against the program's
    algorithm on the rotated q (fp8_mma_ref) and the exact reference on the e4m3 values."""
    from types import SimpleNamespace

    from moska.attention.shared import shared_attention_for_group
    from moska.engine.llm_engine import LLMEngine
    from moska.kernel_ops import kernel_ops
    from moska.kernels.shared_attention_fp8_ref import e4m3, fp8_mma_ref
    from moska.library.fp8_mma import MMA_TILE, attach_token_major_v

    eng = LLMEngine.from_model(
        None, device="cuda", dtype="bfloat16", library_root=str(tmp_path), num_kv_blocks=64
    )
    eng.libraries.build("r", DOCS, chunk_size=16, kv_dtype="fp8_rotated")
    lib = dataclasses.replace(eng.libraries.get("r"), fp8_mma=None)
    why = attach_token_major_v(lib, "mma")
    if why is not None:
        pytest.skip(f"not a Hopper GPU: {why}")
    assert lib.fp8_mma.block_sides == 3 and lib.fp8_mma.q_rotation is lib.q_rotation
    hkv, d = lib.k_pools[0].shape[1:]
    q = torch.randn(3, 2 * hkv, d, generator=torch.Generator().manual_seed(1))
    q = q.cuda().to(lib.q_rotation.dtype)
    group = SimpleNamespace(single=lambda: lib, top_k=lib.num_chunks)
    o, lse, sel = shared_attention_for_group(kernel_ops("triton"), 0, q, group, d**-0.5)
    args = (lib.k_pools[0], lib.v_pools[0], lib.chunk_offsets, sel, d**-0.5, lib.kv_scales(0))
    qr = torch.matmul(q, lib.q_rotation)
    ao, al = fp8_mma_ref(qr, *args, MMA_TILE["block_n"], False, e4m3)
    ro, _ = grouped_shared_attention_ref(q, *args[:-1], **fp8_kwargs(lib, 0))

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    err_o, lib_o, alg_o = rel(o, ao), rel(o, ro), rel(ao, ro)
    assert err_o < 2e-2 and rel(lse, al) < 2e-3 and lib_o <= 1.25 * alg_o, (err_o, lib_o, alg_o)
