import pytest
import torch
from kernel_util import TOL, rel_err

from moska.kernels.paged_attention import (
    paged_attention_ref,
    paged_decode_attention,
    paged_prefill_attention,
)


def _cache(seq, hkv, d, bs, dtype):
    """Random paged cache with shuffled blocks and padded block tables."""
    need = [(s + bs - 1) // bs for s in seq]
    max_blocks = max(need) + 1
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks).int()
    bt = torch.full((len(seq), max_blocks), num_blocks - 1, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[i : i + n]
        i += n
    k = torch.randn(num_blocks, bs, hkv, d, dtype=dtype)
    return k, torch.randn_like(k), bt, torch.tensor(seq, dtype=torch.int32)


def _poison(t, hq, d, dtype):
    return torch.full((t, hq, d), float("nan"), dtype=dtype), torch.full((t, hq), float("nan"))


# Pairwise, not the full product: every G meets both dtypes and both block sizes, and each
# dtype both block sizes (G = 2, 4 at D 64/128: tests/kernels/test_shapes.py).
@pytest.mark.parametrize(
    "dtype,g,bs",
    [
        (torch.float16, 1, 16),
        (torch.float32, 1, 32),
        (torch.float16, 3, 32),
        (torch.float32, 3, 16),
        (torch.float16, 8, 16),
        (torch.float32, 8, 32),
    ],
)
def test_decode(dtype, g, bs):
    hkv, d = 2, 64
    seq = [1, 37, 150, 64]
    k, v, bt, sl = _cache(seq, hkv, d, bs, dtype)
    q = torch.randn(len(seq), hkv * g, d, dtype=dtype)
    out = _poison(len(seq), hkv * g, d, dtype)
    o, lse = paged_decode_attention(q, k, v, bt, sl, 0.125, num_splits=3, block_n=32, out=out)
    ro, rl = paged_attention_ref(
        q, k, v, bt, torch.arange(len(seq) + 1, dtype=torch.int32), sl, 0.125
    )
    assert rel_err(o, ro) < TOL[dtype] and rel_err(lse, rl) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16])  # the split logic; test_decode covers fp32
def test_decode_wide_table_splits_each_context(dtype):
    # a CUDA graph's table is as wide as the longest context allowed: each sequence cuts
    # its own (shorter) context into the grid's splits, some of which stay empty
    hkv, g, d, bs = 2, 4, 64, 16
    seq = [1, 37, 150, 64, 33]
    k, v, bt, sl = _cache(seq, hkv, d, bs, dtype)
    wide = torch.full((len(seq), 64), bt.max().item(), dtype=torch.int32)
    wide[:, : bt.shape[1]] = bt
    q = torch.randn(len(seq), hkv * g, d, dtype=dtype)
    cu = torch.arange(len(seq) + 1, dtype=torch.int32)
    ro, rl = paged_attention_ref(q, k, v, bt, cu, sl, 0.125)
    # 8 splits: ragged (150 tokens = 10 blocks) and empty ones (1 token); test_decode: 3
    out = _poison(len(seq), hkv * g, d, dtype)
    o, lse = paged_decode_attention(q, k, v, wide, sl, 0.125, num_splits=8, block_n=32, out=out)
    assert rel_err(o, ro) < TOL[dtype] and rel_err(lse, rl) < 1e-4


@pytest.mark.parametrize("dtype,g", [(torch.float16, 4), (torch.float32, 6)])
def test_decode_head_dim_128_default_splits(dtype, g):
    hkv, d = 1, 128
    seq = [200, 3]
    k, v, bt, sl = _cache(seq, hkv, d, 16, dtype)
    q = torch.randn(2, hkv * g, d, dtype=dtype)
    o, lse = paged_decode_attention(q, k, v, bt, sl, 0.1, out=_poison(2, hkv * g, d, dtype))
    ro, rl = paged_attention_ref(q, k, v, bt, torch.arange(3, dtype=torch.int32), sl, 0.1)
    assert rel_err(o, ro) < TOL[dtype] and rel_err(lse, rl) < 1e-4


# each dtype once, each block size once (G = 1, 2, 4, 8 at D 64/128: tests/kernels/test_shapes.py)
@pytest.mark.parametrize("dtype,g,bs", [(torch.float16, 3, 16), (torch.float32, 3, 32)])
def test_prefill_causal_varlen(dtype, g, bs):
    hkv, d = 2, 64
    seq = [5, 90, 64, 33]
    q_lens = [5, 20, 1, 33]  # whole prompt, chunked prefill, one token, whole prompt
    k, v, bt, sl = _cache(seq, hkv, d, bs, dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    t = int(cu[-1])
    q = torch.randn(t, hkv * g, d, dtype=dtype)
    o, lse = paged_prefill_attention(
        q, k, v, bt, cu, sl, 0.125, block_m=32, block_n=32, out=_poison(t, hkv * g, d, dtype)
    )
    ro, rl = paged_attention_ref(q, k, v, bt, cu, sl, 0.125)
    assert rel_err(o, ro) < TOL[dtype] and rel_err(lse, rl) < 1e-4


def test_prefill_head_dim_128():
    hkv, g, d = 1, 2, 128
    seq = [40, 17]  # 40 prompt tokens of the first, 7 new tokens of the second
    k, v, bt, sl = _cache(seq, hkv, d, 16, torch.float16)
    cu = torch.tensor([0, 40, 47], dtype=torch.int32)
    q = torch.randn(47, hkv * g, d, dtype=torch.float16)
    o, lse = paged_prefill_attention(
        q, k, v, bt, cu, sl, 0.1, out=_poison(47, hkv * g, d, torch.float16)
    )
    ro, rl = paged_attention_ref(q, k, v, bt, cu, sl, 0.1)
    assert rel_err(o, ro) < 1e-2 and rel_err(lse, rl) < 1e-4


def test_rejects_bad_input():
    k, v, bt, sl = _cache([10], 2, 64, 16, torch.float32)
    q = torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match="block_size"):
        paged_decode_attention(q, k[:, :12], v[:, :12], bt, sl, 0.1)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(q, k, v, bt, sl.long(), 0.1)
    with pytest.raises(ValueError, match="cu_q_lens"):
        paged_prefill_attention(q, k, v, bt, torch.tensor([0, 1]), sl, 0.1)
