"""FP8 libraries on the FP8 tensor-core program (`--fp8-attention mma`, library/fp8_mma.py):
the token-major V copy, when a library can take it, and the engine's one-library attention
path launching the program with it, against the program's own algorithm (fp8_mma_ref)."""

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch

from moska.attention.shared import shared_attention_for_group
from moska.config import EngineConfig
from moska.kernel_ops import kernel_ops
from moska.kernels.shared_attention_fp8_ref import e4m3, fp8_mma_ref, interpreter_e4m3
from moska.kernels.shared_attention_ref import grouped_shared_attention_ref
from moska.library.fp8 import BLOCK_ROWS, quantize
from moska.library.fp8_mma import MMA_TILE, TokenMajorV, attach_token_major_v, token_major

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CUDA = pytest.mark.skipif(
    _INTERPRET or not torch.cuda.is_available(),
    reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0; bf16 is wrong interpreted)",
)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _library(device, dtype, lens=(16, 48, 37), hkv=2, d=64, seed=0, v_gran="token"):
    """A one-layer FP8 library as the attention path reads it (chunks at multiples of 16
    rows, the last ragged: S = 101, V's token-major copy padded to 112)."""
    gen = torch.Generator().manual_seed(seed)
    s = sum(lens)
    k = torch.randn(s, hkv, d, generator=gen) * (0.2 + 0.6 * torch.rand(s, 1, 1, generator=gen))
    v = torch.randn(s, hkv, d, generator=gen) * (0.1 + 4 * torch.rand(s, 1, 1, generator=gen))
    offs = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    offs = offs.to(device)
    kq, vq = quantize(k.to(device, dtype), offs), quantize(v.to(device, dtype), offs, v_gran)
    scales = [(kq.scale, vq.scale)]
    return SimpleNamespace(
        k_pools=[kq.data], v_pools=[vq.data], chunk_offsets=offs, num_chunks=len(lens),
        kv_scale_pools=scales, kv_scales=lambda layer: scales[layer], tiers=None, fp8_mma=None,
    )  # fmt: skip


def test_token_major_copy_pads_with_zeros():
    v = torch.randn(37, 2, 8).to(torch.float8_e4m3fn)
    t = token_major(v)
    assert t.shape == (2, 8, 48) and t.is_contiguous()
    assert torch.equal(t[:, :, :37].float(), v.float().permute(1, 2, 0))
    assert not t[:, :, 37:].float().any()


def test_attach_says_why_not_and_checks_the_mode():
    lib = _library("cpu", torch.float16)
    assert "cpu" in attach_token_major_v(lib, "mma") and lib.fp8_mma is None
    assert attach_token_major_v(lib, "upcast") is None and lib.fp8_mma is None
    with pytest.raises(ValueError, match="fp8_attention must be one of"):
        attach_token_major_v(lib, "fast")
    lib.kv_scale_pools = None
    assert "not an FP8 library" in attach_token_major_v(lib, "mma")
    with pytest.raises(ValueError, match="fp8_attention"):
        EngineConfig(fp8_attention="fp8")


def _group_path(lib, device, dtype, q_split, cast):
    """The engine's one-library path (every chunk) with a spy on the kernel's keywords."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 64, generator=gen).to(device, dtype)  # B 3, Hq 4, Hkv 2
    seen: list[dict] = []
    base = kernel_ops("triton")

    def spy(*a, **kw):
        seen.append(kw)
        return base.grouped_shared(*a, **kw)

    ops = dataclasses.replace(base, grouped_shared=spy)
    group = SimpleNamespace(single=lambda: lib, top_k=lib.num_chunks)
    o, lse, sel = shared_attention_for_group(ops, 0, q, group, 0.125)
    assert seen[0]["fp8_mma"] and seen[0]["v_pool_t"] is lib.fp8_mma.pools[0]
    assert seen[0]["fp8_q_split"] == q_split and seen[0]["block_n"] == MMA_TILE["block_n"]
    assert seen[0].get("fp8_scale_block", 0) == lib.fp8_mma.v_block_rows  # V block scales
    assert getattr(seen[0].get("fp8_scale_block"), "sides", 2) == 2
    args = (q, lib.k_pools[0], lib.v_pools[0], lib.chunk_offsets, sel, 0.125, lib.kv_scales(0))
    ao, al = fp8_mma_ref(*args, MMA_TILE["block_n"], q_split, cast)
    ro, _ = grouped_shared_attention_ref(*args[:-1], kv_scales=lib.kv_scales(0))
    return _rel(o, ao), _rel(lse, al), _rel(o, ro), _rel(ao, ro)


@pytest.mark.skipif(not _INTERPRET, reason="interpreter only (TRITON_INTERPRET=1)")
def test_engine_path_reads_token_major_v_interpreted():
    # CPU has no FP8 tensor cores: the copy is attached by hand (attach refuses CPU above)
    lib = _library("cpu", torch.float16)
    lib.fp8_mma = TokenMajorV([token_major(lib.v_pools[0])], False, 0)
    err_o, err_l, _, _ = _group_path(lib, "cpu", torch.float16, False, interpreter_e4m3)
    assert err_o < 1e-3 and err_l < 1e-4, (err_o, err_l)


@pytest.mark.skipif(not _INTERPRET, reason="interpreter only (TRITON_INTERPRET=1)")
def test_engine_path_reads_v_block_scales_interpreted():
    # V scales per 128-row block, K per token (bench/results/fp8_quality_mixed.json): the
    # path launches with SidedBlock(128, V) and matches the algorithm on those scales
    lib = _library("cpu", torch.float16, lens=(16, 160, 37), v_gran="block")
    lib.fp8_mma = TokenMajorV([token_major(lib.v_pools[0])], True, 0, v_block_rows=BLOCK_ROWS)
    err_o, err_l, _, _ = _group_path(lib, "cpu", torch.float16, True, interpreter_e4m3)
    assert err_o < 1e-3 and err_l < 1e-4, (err_o, err_l)


@_CUDA
def test_engine_path_reads_a_rotated_block_library_on_fp8_tensor_cores():
    # as the interpreted test: rotated K, K and V per 128-row block, one-term q rotated at
    # launch; on the GPU weights on an e4m3 rounding edge flip a step (as above)
    from moska.library.fp8 import hadamard

    lib = _library("cuda", torch.bfloat16, lens=(16, 160, 37), v_gran="block")
    why = attach_token_major_v(lib, "mma")
    if why is not None:
        pytest.skip(f"not a Hopper GPU: {why}")
    rot = hadamard(64).cuda()
    k = torch.randn(213, 2, 64, generator=torch.Generator().manual_seed(3)).cuda().bfloat16()
    kq = quantize(k @ rot.bfloat16(), lib.chunk_offsets, "block")
    lib.k_pools = [kq.data]
    lib.kv_scale_pools[0] = (kq.scale, lib.kv_scale_pools[0][1])
    lib.fp8_mma = dataclasses.replace(
        lib.fp8_mma, v_block_rows=BLOCK_ROWS, block_sides=3, q_rotation=rot.bfloat16()
    )
    q = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(1)).cuda().bfloat16()
    group = SimpleNamespace(single=lambda: lib, top_k=lib.num_chunks)
    o, lse, sel = shared_attention_for_group(kernel_ops("triton"), 0, q, group, 0.125)
    args = (lib.k_pools[0], lib.v_pools[0], lib.chunk_offsets, sel, 0.125, lib.kv_scales(0))
    qr = torch.matmul(q, rot.bfloat16())
    ao, al = fp8_mma_ref(qr, *args, MMA_TILE["block_n"], False, e4m3)
    ro, _ = grouped_shared_attention_ref(qr, *args[:-1], kv_scales=lib.kv_scales(0))
    err_o, lib_o, alg_o = _rel(o, ao), _rel(o, ro), _rel(ao, ro)
    assert err_o < 2e-2 and _rel(lse, al) < 2e-3 and lib_o <= 1.25 * alg_o, (err_o, lib_o, alg_o)


@_CUDA
@pytest.mark.parametrize("mode", ["mma", "mma_qsplit", "mma_qsplit_vb"])
def test_engine_path_on_fp8_tensor_cores(mode):
    vb = mode.endswith("_vb")  # V scales per 128-row block (SidedBlock)
    lens, v_gran = ((16, 160, 37), "block") if vb else ((16, 48, 37), "token")
    lib = _library("cuda", torch.bfloat16, lens=lens, v_gran=v_gran)
    why = attach_token_major_v(lib, mode.removesuffix("_vb"))
    assert why is None or "Hopper" in why, why
    if why is not None:
        pytest.skip(f"not a Hopper GPU: {why}")
    if vb:
        lib.fp8_mma = dataclasses.replace(lib.fp8_mma, v_block_rows=BLOCK_ROWS)
    s_pad = -(-int(lib.chunk_offsets[-1]) // 16) * 16
    assert lib.fp8_mma.nbytes == 2 * 64 * s_pad  # Hkv x D x S padded to 16, one byte each
    err_o, err_l, lib_o, alg_o = _group_path(lib, "cuda", torch.bfloat16, mode != "mma", e4m3)
    # weights on an e4m3 rounding edge flip a step on the GPU (bench/fp8_attention.mma_ok)
    assert err_o < 2e-2 and err_l < 2e-3 and lib_o <= 1.25 * alg_o, (err_o, lib_o, alg_o)


def test_q_split_from_a_layer_and_v_block_keywords():
    # q split in the later layers only (fp8_quality_layers.json) and V block scales reach
    # the kernel's keywords per KV slot
    from moska.kernels.shared_attention_fp8 import SidedBlock
    from moska.library.fp8_mma import mma_kwargs

    pools = [torch.zeros(2, 8, 16, dtype=torch.float8_e4m3fn) for _ in range(4)]
    lib = SimpleNamespace(fp8_mma=TokenMajorV(pools, True, 0, q_split_from=2))
    assert [mma_kwargs(lib, i)["fp8_q_split"] for i in range(4)] == [False, False, True, True]
    assert all("fp8_scale_block" not in mma_kwargs(lib, i) for i in range(4))
    lib.fp8_mma = dataclasses.replace(lib.fp8_mma, v_block_rows=BLOCK_ROWS)
    sb = mma_kwargs(lib, 3)["fp8_scale_block"]
    assert isinstance(sb, SidedBlock) and sb == BLOCK_ROWS and sb.sides == 2
    lib.fp8_mma = TokenMajorV(pools, False, 0, q_split_from=2)
    assert not any(mma_kwargs(lib, i)["fp8_q_split"] for i in range(4))


def test_qsplit_late_splits_q_in_the_later_half_of_the_layers(monkeypatch):
    # --fp8-attention mma_qsplit_late: q in two e4m3 terms from KV slot L // 2 on (the
    # quality model kept top-1 >= 0.99 so, bench/results/fp8_quality_layers.json)
    from moska.library import fp8_mma

    monkeypatch.setattr(fp8_mma, "mma_unfit", lambda library: None)  # CPU: no TMA to check
    lib = _library("cpu", torch.float16)
    lib.v_pools = lib.v_pools * 4  # four KV slots
    assert attach_token_major_v(lib, "mma_qsplit_late") is None
    assert lib.fp8_mma.q_split and lib.fp8_mma.q_split_from == 2
    split = [fp8_mma.mma_kwargs(lib, i)["fp8_q_split"] for i in range(4)]
    assert split == [False, False, True, True]
    lib.fp8_mma = None
    assert attach_token_major_v(lib, "mma_qsplit") is None and lib.fp8_mma.q_split_from == 0
    EngineConfig(fp8_attention="mma_qsplit_late")  # accepted by the engine's config
    with pytest.raises(ValueError, match="mma_qsplit_late"):
        EngineConfig(fp8_attention="late")


def test_v_block_scales_are_found_at_attach(monkeypatch):
    # a library whose V scales are constant over 128-row blocks from each chunk's start (V
    # quantized per block, K per token) is read with one V scale per key block; per-token V
    # scales are not
    from moska.library import fp8_mma

    monkeypatch.setattr(fp8_mma, "mma_unfit", lambda library: None)  # CPU: no TMA to check
    for v_gran, want in (("block", BLOCK_ROWS), ("token", 0)):
        lib = _library("cpu", torch.float16, lens=(16, 160, 37), v_gran=v_gran)
        assert attach_token_major_v(lib, "mma_qsplit") is None
        assert lib.fp8_mma.v_block_rows == want, v_gran


@pytest.mark.skipif(not _INTERPRET, reason="interpreter only (TRITON_INTERPRET=1)")
def test_engine_path_reads_a_rotated_block_library_interpreted():
    # K stored rotated (k R, library/fp8.hadamard) with K and V scales per 128-row block
    # (block_sides 3) and one-term q: the path passes q_rotation and a plain block size, and
    # matches the algorithm on the rotated q; without the rotation o is far off
    from moska.library.fp8 import hadamard
    from moska.library.fp8_mma import mma_kwargs

    lib = _library("cpu", torch.float16, lens=(16, 160, 37), v_gran="block")
    rot = hadamard(64)
    k = torch.randn(213, 2, 64, generator=torch.Generator().manual_seed(3)).half()
    kq = quantize(k @ rot.half(), lib.chunk_offsets, "block")
    lib.k_pools = [kq.data]
    lib.kv_scale_pools[0] = (kq.scale, lib.kv_scale_pools[0][1])
    tmv = TokenMajorV([token_major(lib.v_pools[0])], False, 0, v_block_rows=BLOCK_ROWS)
    lib.fp8_mma = dataclasses.replace(tmv, block_sides=3, q_rotation=rot.half())
    kw = mma_kwargs(lib, 0)
    assert kw["fp8_scale_block"] == BLOCK_ROWS and not hasattr(kw["fp8_scale_block"], "sides")
    assert kw["q_rotation"] is lib.fp8_mma.q_rotation
    q = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(1)).half()
    group = SimpleNamespace(single=lambda: lib, top_k=lib.num_chunks)
    o, lse, sel = shared_attention_for_group(kernel_ops("triton"), 0, q, group, 0.125)
    args = (lib.k_pools[0], lib.v_pools[0], lib.chunk_offsets, sel, 0.125, lib.kv_scales(0))
    qr = torch.matmul(q, rot.half())
    ao, al = fp8_mma_ref(qr, *args, MMA_TILE["block_n"], False, interpreter_e4m3)
    assert _rel(o, ao) < 1e-3 and _rel(lse, al) < 1e-4, (_rel(o, ao), _rel(lse, al))
    wrong, _ = fp8_mma_ref(q, *args, MMA_TILE["block_n"], False, interpreter_e4m3)
    assert _rel(o, wrong) > 0.1, _rel(o, wrong)


def test_hadamard_is_orthonormal_and_seeded():
    from moska.library.fp8 import hadamard

    r = hadamard(64)
    assert torch.allclose(r @ r.T, torch.eye(64), atol=1e-6)
    assert torch.equal(r, hadamard(64)) and not torch.equal(r, hadamard(64, seed=1))
    assert set(r.abs().flatten().tolist()) == {0.125}  # every entry +-1/sqrt(64)
    with pytest.raises(ValueError, match="power of two"):
        hadamard(96)
