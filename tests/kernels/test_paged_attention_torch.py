"""The engine's PyTorch paged attention (kernels/paged_attention_torch.py) equals the
reference on fresh random inputs: decode and varlen causal prefill (whole prompts, a chunk
of one, single rows, a request with no rows), fp32 and fp16, GQA 1-8, query blocks that
split prompts unevenly, and cache slots no request owns holding NaN."""

import pytest
import torch

from moska.kernel_ops import kernel_ops
from moska.kernels.paged_attention import paged_attention_ref
from moska.kernels.paged_attention_torch import paged_attention_torch


def _case(seed, seq, q_lens, g, bs, dtype, hkv=2, d=32):
    gen = torch.Generator().manual_seed(seed)
    need = [(s + bs - 1) // bs for s in seq]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).int()
    bt = torch.full((len(seq), max(need) + 1), -1, dtype=torch.int32)  # unused: -1
    i = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[i : i + n]
        i += n
    k = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype)
    v = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype)
    for blk in perm[i:].tolist():  # blocks no request owns hold anything
        k[blk], v[blk] = float("nan"), float("nan")
    for b, s in enumerate(seq):  # and the tail of each request's last block
        if s % bs:
            last = int(bt[b, need[b] - 1])
            k[last, s % bs :], v[last, s % bs :] = float("nan"), float("nan")
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hkv * g, d, generator=gen).to(dtype)
    return q, k, v, bt, cu, torch.tensor(seq, dtype=torch.int32)


def _check(args, block_q, tol):
    ro, rl = paged_attention_ref(*args, 0.125)
    o, lse = paged_attention_torch(*args, 0.125, block_q=block_q)
    assert o.dtype == lse.dtype == torch.float32 and not bool(o.isnan().any())
    assert float((o - ro).abs().max() / ro.abs().max()) < tol
    assert float((lse - rl).abs().max() / rl.abs().max()) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
@pytest.mark.parametrize("g", [1, 3, 8])
def test_decode(dtype, tol, g):
    seq = [5, 90, 64, 33, 1, 17]
    _check(_case(g, seq, [1] * len(seq), g, 16, dtype), 256, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
@pytest.mark.parametrize("block_q", [256, 7, 1])
def test_prefill_causal_varlen(dtype, tol, block_q):
    # whole prompt, chunked prefill, one token, whole prompt, a request with no rows
    seq, q_lens = [5, 90, 64, 33, 40], [5, 20, 1, 33, 0]
    _check(_case(7, seq, q_lens, 2, 32, dtype), block_q, tol)


def test_the_engine_table_runs_it():
    ops = kernel_ops("torch")
    q, k, v, bt, cu, sl = _case(1, [9, 40], [1, 1], 2, 16, torch.float32)
    o, lse = ops.paged_decode(q, k, v, bt, sl, 0.125)
    ro, rl = paged_attention_ref(q, k, v, bt, cu, sl, 0.125)
    assert torch.allclose(o, ro, atol=1e-5) and torch.allclose(lse, rl, atol=1e-5)
    assert ops.paged_prefill.__name__ == "_paged_prefill_torch"
