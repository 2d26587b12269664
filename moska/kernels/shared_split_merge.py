"""Exact merge of the split-KV partial states of grouped shared-chunk attention.

A long chunk read by few row tiles is split along the sequence; each (tile, split) item
writes a partial (o, lse) to a scratch buffer, and this kernel merges a tile's partials by
log-sum-exp into the output rows. The merge is spread over the tile's own split programs
(split s merges row sub-blocks s, s + n_split, ...) and loads many partials per step, so a
tile with dozens of splits costs a few memory latencies, not one per split.
"""

import torch
import triton
import triton.language as tl

from .merge import merge_finish


@triton.jit
def _merge_tile_splits_kernel(
    work_ptr,  # [5, W_max] int32
    meta_ptr,  # [2] int32: items W, split_len
    o_part_ptr,  # [W_max, BLOCK_M, D] fp32
    lse_part_ptr,  # [W_max, BLOCK_M] fp32
    o_ptr,  # [N * G, D]
    lse_ptr,  # [N * G] fp32
    W,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MERGE_M: tl.constexpr,
    SPLIT_B: tl.constexpr,
):
    # One program per item. The partials of a split tile are the consecutive items
    # first .. first + n_split - 1; the tile's rows are cut into sub-blocks of MERGE_M rows
    # and split s merges sub-blocks s, s + n_split, ..., so up to BLOCK_M / MERGE_M programs
    # share a tile's merge. Each loads SPLIT_B partials at once: the loads of a step are
    # independent, so a long split list is not a chain of one memory latency per split.
    w = tl.program_id(0)
    n_split = tl.load(work_ptr + 4 * W + w)
    if (w < tl.load(meta_ptr)) & (n_split > 1):
        split = tl.load(work_ptr + 3 * W + w)
        first = w - split
        start = tl.load(work_ptr + w)
        n_sel = tl.load(work_ptr + W + w)
        tile = tl.load(work_ptr + 2 * W + w)
        offs_r = tl.arange(0, MERGE_M)
        offs_s = tl.arange(0, SPLIT_B)
        offs_d = tl.arange(0, D)
        for sub in range(split, BLOCK_M // MERGE_M, n_split):
            r = sub * MERGE_M + offs_r  # rows of the tile
            rows = tile * BLOCK_M + r
            row_ok = rows < n_sel * G
            m_i = tl.full([MERGE_M], float("-inf"), tl.float32)
            l_i = tl.zeros([MERGE_M], tl.float32)
            acc = tl.zeros([MERGE_M, D], tl.float32)
            for s0 in range(0, n_split, SPLIT_B):
                s_ok = (s0 + offs_s) < n_split
                part = (first + s0 + offs_s).to(tl.int64)[:, None] * BLOCK_M + r[None, :]
                lse2 = tl.load(lse_part_ptr + part, mask=s_ok[:, None], other=float("-inf"))
                lse2 = lse2 * 1.4426950408889634  # [SPLIT_B, MERGE_M]
                # every split wrote its partial (an empty one o = 0, lse = -inf), so this
                # load need not wait for lse: both loads of a step are in flight together
                o = tl.load(
                    o_part_ptr + part[:, :, None] * D + offs_d[None, None, :],
                    mask=s_ok[:, None, None],
                    other=0.0,
                )
                m_new = tl.maximum(m_i, tl.max(lse2, 0))
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_sub)
                wt = tl.math.exp2(lse2 - m_sub[None, :])
                acc = acc * alpha[:, None] + tl.sum(wt[:, :, None] * o, 0)
                l_i = l_i * alpha + tl.sum(wt, 0)
                m_i = m_new
            o_t, lse = merge_finish(m_i, l_i, acc)
            out_rows = (start * G + rows).to(tl.int64)
            tl.store(
                o_ptr + out_rows[:, None] * D + offs_d[None, :],
                o_t.to(o_ptr.dtype.element_ty),
                mask=row_ok[:, None],
            )
            tl.store(lse_ptr + out_rows, lse, mask=row_ok)


def merge_tile_splits(
    work: torch.Tensor,  # [5, W_max] int32 work list
    meta: torch.Tensor,  # [2] int32: items W, split_len
    o_part: torch.Tensor,  # [W_max, BLOCK_M, D] fp32
    lse_part: torch.Tensor,  # [W_max, BLOCK_M] fp32
    o: torch.Tensor,  # [N, G, D] output
    lse: torch.Tensor,  # [N, G] fp32 output
    group: int,
    block_m: int,
    merge_m: int,
    split_b: int,
) -> None:
    """Writes the merged rows of every split tile into (o, lse); other rows are untouched."""
    w_max, d = work.shape[1], o.shape[-1]
    _merge_tile_splits_kernel[(w_max,)](
        work,
        meta,
        o_part,
        lse_part,
        o,
        lse,
        w_max,
        G=group,
        D=d,
        BLOCK_M=block_m,
        MERGE_M=min(merge_m, block_m),
        SPLIT_B=split_b,
        num_warps=4,
    )
