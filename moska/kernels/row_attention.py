"""Attention of query rows at arbitrary positions of one sequence over its KV, causal by
position: row r sits at `positions[r]` and sees the keys of positions 0..positions[r].

The rows SemShareKV recomputes (moska/semshare/blend.py) are scattered over the prompt:
every token in the first layers, then the unmatched and most deviating ~20% of it. Dense
attention with an [R, S] mask reads every key for every row; here a program owns a tile
of rows for the G query heads of one KV head (flattened as row = j * G + g, so one K/V
block serves every head of the group) and stops at the tile's largest position. Rows
sorted by position keep a tile's positions close, so most of its key blocks are visible
to all of its rows and run unmasked. Any order is correct; sorted is fast.

Keys of position n live at slot `slots[n]` of k and v ([num_slots, Hkv, D]): a paged
cache viewed flat is a block table with one token per block, so the inner loop is the
paged attention kernel's with BLOCK_SIZE = 1. No host sync.
"""

import torch
import triton
import triton.language as tl

from .merge import merge_finish
from .paged_attention import _paged_attn_inner
from .qkv_checks import check_qkv

LOG2E = 1.4426950408889634


@triton.jit
def _row_attention_kernel(
    q_ptr,  # [R, Hq, D]
    k_ptr,  # [num_slots, Hkv, D]
    v_ptr,  # [num_slots, Hkv, D]
    slots_ptr,  # [S] int32/int64: slot of each key position
    pos_ptr,  # [R] int32: position of each row (< S)
    o_ptr,  # [R, Hq, D]
    R,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    qk_scale,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = tile * BLOCK_M + offs_m
    row_ok = rows < R * G
    j = tl.minimum(rows // G, R - 1)  # padding rows repeat the last row (never stored)
    head = kv * G + rows % G
    pos = tl.load(pos_ptr + j)  # [BLOCK_M]
    q = tl.load(
        q_ptr + j.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    )
    hi = tl.max(pos, 0) + 1  # the tile's last visible key + 1
    full_hi = ((tl.min(pos, 0) + 1) // BLOCK_N) * BLOCK_N  # whole blocks every row sees
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    k_base = k_ptr + kv * stride_kh
    v_base = v_ptr + kv * stride_vh
    # fmt: off
    acc, m_i, l_i = _paged_attn_inner(
        acc, m_i, l_i, q, k_base, v_base, slots_ptr, pos, 0, full_hi, qk_scale,
        stride_ks, 0, stride_vs, 0, BLOCK_N, 1, D, False, PRECISION,
    )
    acc, m_i, l_i = _paged_attn_inner(
        acc, m_i, l_i, q, k_base, v_base, slots_ptr, pos, full_hi, hi, qk_scale,
        stride_ks, 0, stride_vs, 0, BLOCK_N, 1, D, True, PRECISION,
    )
    # fmt: on
    o, _ = merge_finish(m_i, l_i, acc)
    tl.store(
        o_ptr + j.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def row_attention(
    q: torch.Tensor,  # [R, Hq, D]
    k: torch.Tensor,  # [num_slots, Hkv, D]
    v: torch.Tensor,  # [num_slots, Hkv, D]
    slots: torch.Tensor,  # [S] int32 or int64: slot of key position n
    positions: torch.Tensor,  # [R] int32, each < S; ascending for speed
    sm_scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """o [R, Hq, D] (q.dtype): row r attends to the keys of positions 0..positions[r].

    Positions are not checked against S (that would read them on the host): the caller
    guarantees 0 <= positions < S, as for a block table's entries."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"q must be [R,Hq,D] and k [num_slots,Hkv,D]; got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    check_qkv(q, k, v, "k", "v")
    r, hq, d = q.shape
    if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64) or slots.stride(0) != 1:
        raise ValueError(f"slots must be a contiguous int32/int64 [S], got {slots.dtype}")
    if positions.shape != (r,) or positions.dtype != torch.int32 or positions.stride(0) != 1:
        raise ValueError(
            f"positions must be a contiguous int32 [R]={r}, got {positions.dtype} "
            f"{tuple(positions.shape)}"
        )
    devs = {t.device for t in (q, k, v, slots, positions)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {devs}")
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    if r == 0:
        return o
    g = hq // k.shape[1]
    cuda = q.is_cuda
    # Tiles of 16 rows x 4 heads on CUDA: ~1,000 rows x 8 KV heads make ~500 programs, and a
    # tile of sorted scattered rows spans few key blocks past its first row's position
    block_m = block_m or max(16, min(64, triton.next_power_of_2(16 * g)))
    # key blocks of 128 for scattered rows (fewer than half the positions: 973 of 5,120 on an
    # H200, 0.136 ms vs 0.153 at 64), of 64 for (nearly) every row (0.40 ms vs 0.42 at 128)
    block_n = block_n or ((128 if 2 * r < slots.shape[0] else 64) if cuda else 16)
    grid = (triton.cdiv(r * g, block_m), k.shape[1])
    # fmt: off
    _row_attention_kernel[grid](
        q, k, v, slots, positions, o, r,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), sm_scale * LOG2E,
        G=g, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or 4, num_stages=num_stages or (2 if cuda else 1),
    )
    # fmt: on
    return o
