"""The FP8 key-max kernel (router_fp8.py) against its reference and the fp32 scores."""

import os

import pytest
import torch

from moska.kernels.router import build_routing_index
from moska.kernels.router_dense import keymax_dense_scores
from moska.kernels.router_fp8 import (
    Q_NORM,
    keymax_fp8_ref,
    keymax_fp8_scores,
    project_queries_fp8,
    quantize_lowrank_keys,
)


def _problem(b, hkv, g, d, lens, rank, seed):
    torch.manual_seed(seed)
    offs = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    k = torch.randn(int(offs[-1]), hkv, d)
    q = torch.randn(b, hkv * g, d)
    index = build_routing_index(k, offs, rank)
    return q, index


@pytest.mark.parametrize("f16_acc", [True, False])
@pytest.mark.parametrize("b,hkv,g,d,lens,rank", [(5, 2, 4, 32, (40, 64, 17), 8),
                                                  (3, 1, 3, 16, (130, 5), 16)])  # fmt: skip
def test_fp8_keymax_kernel_matches_its_reference(f16_acc, b, hkv, g, d, lens, rank):
    q, index = _problem(b, hkv, g, d, lens, rank, seed=b + d)
    keys8, ks = quantize_lowrank_keys(index.lowrank_keys, index.chunk_offsets)
    q8, qs = project_queries_fp8(q, index.basis)
    ref = keymax_fp8_ref(q8, qs, keys8, ks, index.chunk_offsets)
    got = keymax_fp8_scores(q8, qs, keys8, ks, index.chunk_offsets, block_b=4, block_n=32,
                            f16_acc=f16_acc)  # fmt: skip
    tol = 2e-3 if f16_acc else 1e-5  # fp16 accumulation rounds each raw product sum
    assert torch.allclose(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_fp8_keymax_stays_close_to_the_exact_scores_and_routes_alike():
    q, index = _problem(16, 2, 4, 64, (64,) * 16, 16, seed=3)
    exact = keymax_dense_scores(q, index.basis, index.lowrank_keys, index.chunk_offsets,
                                use_triton=False)  # fmt: skip
    keys8, ks = quantize_lowrank_keys(index.lowrank_keys, index.chunk_offsets)
    q8, qs = project_queries_fp8(q, index.basis)
    got = keymax_fp8_scores(q8, qs, keys8, ks, index.chunk_offsets, block_b=8, block_n=32)
    rel = (got - exact).norm() / exact.norm()
    assert rel < 0.05, rel  # e4m3: 3 mantissa bits on both sides
    top_exact = exact.topk(4, -1).indices.sort(-1).values
    top_fp8 = got.topk(4, -1).indices.sort(-1).values
    assert (top_exact == top_fp8).float().mean() > 0.8


def test_fp8_query_rows_fit_fp16_accumulation():
    q, index = _problem(4, 2, 2, 32, (32, 32), 32, seed=5)
    q8, _qs = project_queries_fp8(q * 1e4, index.basis)  # large queries: the cut absorbs it
    assert torch.isfinite(q8.float()).all()
    assert (q8.float().norm(dim=-1) <= Q_NORM * 1.07).all()  # e4m3 rounding of each element
    keys8, _ = quantize_lowrank_keys(index.lowrank_keys, index.chunk_offsets)
    assert keys8.float().abs().max() <= 448


def test_fp8_keymax_refuses_other_dtypes():
    q, index = _problem(2, 1, 2, 16, (8, 8), 4, seed=0)
    keys8, ks = quantize_lowrank_keys(index.lowrank_keys, index.chunk_offsets)
    q8, qs = project_queries_fp8(q, index.basis)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        keymax_fp8_scores(q8.float(), qs, keys8, ks, index.chunk_offsets)
    with pytest.raises(ValueError, match="shapes disagree"):
        keymax_fp8_scores(q8, qs[:1], keys8, ks, index.chunk_offsets)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
    reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0: FP8 tensor cores)",
)
@pytest.mark.parametrize("f16_acc", [True, False])
def test_fp8_keymax_compiled_matches_its_reference(f16_acc):
    q, index = _problem(37, 4, 4, 128, (4096, 4096, 1000, 4096), 32, seed=11)
    q, index = (
        q.cuda().bfloat16(),
        index._replace(**{f: getattr(index, f).cuda() for f in index._fields}),
    )
    keys8, ks = quantize_lowrank_keys(index.lowrank_keys, index.chunk_offsets)
    q8, qs = project_queries_fp8(q, index.basis)
    ref = keymax_fp8_ref(q8, qs, keys8, ks, index.chunk_offsets)
    got = keymax_fp8_scores(q8, qs, keys8, ks, index.chunk_offsets, f16_acc=f16_acc)
    # Hopper's FP8 MMA accumulates below fp32 precision: "fp32" came out 7e-5 from the fp32
    # reference on the H200 (session 23), fp16 accumulation within 2e-3
    tol = 2e-3 if f16_acc else 5e-4
    assert torch.allclose(got, ref, rtol=tol, atol=tol * ref.abs().max().item())
