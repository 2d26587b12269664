"""row_attention (rows at scattered positions, causal by position, keys through a slot map)
against its row-by-row reference: interpreter on the CPU, compiled on CUDA."""

import os

import pytest
import torch
from kernel_util import TOL, rel_err

from moska.kernels.row_attention import row_attention
from moska.kernels.row_attention_ref import row_attention_ref

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CPU = pytest.mark.skipif(not _INTERPRET, reason="interpreter only (TRITON_INTERPRET=1)")
_CUDA = pytest.mark.skipif(
    _INTERPRET or not torch.cuda.is_available(),
    reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0)",
)


def _inputs(s, positions, hkv, g, d, dtype, device="cpu", seed=0, slot_dtype=torch.int64):
    """Random q, k, v (k, v in a pool of 2S slots, position n at a random slot)."""
    gen = torch.Generator().manual_seed(seed)
    r = len(positions)
    q = torch.randn(r, hkv * g, d, generator=gen).to(device, dtype)
    k = torch.randn(2 * s, hkv, d, generator=gen).to(device, dtype)
    v = (torch.randn(2 * s, hkv, d, generator=gen) * 3).to(device, dtype)
    slots = torch.randperm(2 * s, generator=gen)[:s].to(device, slot_dtype)
    pos = torch.tensor(positions, dtype=torch.int32, device=device)
    return q, k, v, slots, pos


@_CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("g", [1, 4])
def test_scattered_rows_match_reference(dtype, g):
    s = 37  # not a multiple of the key block: the last block is partial
    positions = [0, 1, 5, 6, 17, 18, 19, 30, 36]  # incl. the first and the last position
    q, k, v, slots, pos = _inputs(s, positions, 2, g, 16, dtype)
    out = row_attention(q, k, v, slots, pos, 0.3, block_m=16, block_n=16)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, row_attention_ref(q, k, v, slots, pos, 0.3)) < TOL[dtype]


@_CPU
def test_every_row_causal_int32_slots_and_unsorted_rows():
    """Every position 0..S-1 (a first layer) with an int32 slot map; then the same rows
    shuffled: any order is correct, sorted is only faster."""
    s = 40
    q, k, v, slots, pos = _inputs(s, list(range(s)), 1, 2, 32, torch.float32, seed=1)
    slots = slots.to(torch.int32)
    want = row_attention_ref(q, k, v, slots, pos, 0.2)
    assert rel_err(row_attention(q, k, v, slots, pos, 0.2, block_n=16), want) < 1e-4
    perm = torch.randperm(s, generator=torch.Generator().manual_seed(2))
    out = row_attention(q[perm].contiguous(), k, v, slots, pos[perm].contiguous(), 0.2)
    assert rel_err(out, want[perm]) < 1e-4


@_CPU
def test_no_rows_and_bad_inputs():
    q, k, v, slots, pos = _inputs(8, [2, 7], 2, 2, 16, torch.float32)
    assert row_attention(q[:0], k, v, slots, pos[:0], 0.5).shape == (0, 4, 16)
    with pytest.raises(ValueError, match="positions must be a contiguous int32"):
        row_attention(q, k, v, slots, pos.long(), 0.5)
    with pytest.raises(ValueError, match="slots must be"):
        row_attention(q, k, v, slots.float(), pos, 0.5)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        row_attention(q[:, :3], k, v, slots, pos, 0.5)
    with pytest.raises(ValueError, match="dtypes differ"):
        row_attention(q.half(), k, v, slots, pos, 0.5)


@_CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    s = 1500
    pos = torch.randperm(s - 2, generator=gen)[:300].add(1).sort().values
    positions = [0, *pos.tolist(), s - 1]
    q, k, v, slots, pos = _inputs(s, positions, 8, 4, 64, dtype, "cuda", seed=4)
    want = row_attention_ref(q, k, v, slots, pos, 0.125)
    assert rel_err(row_attention(q, k, v, slots, pos, 0.125), want) < TOL.get(dtype, 1e-2)
