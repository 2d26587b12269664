"""The Triton programs of grouped shared-chunk attention (launched by `shared_attention.py`).

One program handles one work item (group, row tile, split) of the work list
(`shared_work_list.py`): it loads the tile's query rows once, streams the chunk's K/V blocks
(pointer or TMA path, bf16/fp16 or e4m3 upcast in registers) through an online softmax, and
stores the tile's (o, lse), or its partial state when the tile is one split of a long chunk
(merged by `shared_split_merge.py`).
"""

import triton
import triton.language as tl

from .merge import merge_finish
from .shared_attention_pipe import _chunk_attn_inner_pipe, _softmax_pv

LOG2E = 1.4426950408889634  # scores run in the log2 domain: exp(x) = exp2(x * LOG2E)


@triton.jit
def _chunk_attn_inner(
    acc,
    m_i,
    l_i,
    q,  # [BLOCK_M, D] fp32, [BLOCK_M], [BLOCK_M], [BLOCK_M, D]
    k_ptrs,
    v_ptrs,  # [D, BLOCK_N] and [BLOCK_N, D] pointers to the block at `lo` (pointer path)
    k_desc,
    v_desc,  # TMA descriptors of the pools as [S_total, Hkv * D] (TMA path)
    col,  # first column of this KV head in the descriptors' rows
    lo,
    hi,
    qk_scale,
    stride_kn,
    stride_vn,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    USE_TMA: tl.constexpr,
    WARP_SPEC: tl.constexpr,
    PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr = False,
    FP8_DOT: tl.constexpr = False,
    CDTYPE: tl.constexpr = None,
    PER_TOKEN: tl.constexpr = False,
    sc_ptrs=None,  # [BLOCK_N] offsets of this head's per-token scales at `lo` (PER_TOKEN)
    k_scale_ptr=None,
    v_scale_ptr=None,
    stride_sc=0,
):
    # Online softmax over keys [lo, hi) in blocks of BLOCK_N; scores in the log2 domain.
    # Unmasked calls need (hi - lo) % BLOCK_N == 0; masked calls run one partial block.
    # A TMA block may run past `hi` into the next chunk (or zero padding past the pool's
    # end): those keys get score -inf and their values weight 0.
    offs_n = tl.arange(0, BLOCK_N)
    for start in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        if USE_TMA:
            k = k_desc.load([start, col])  # [BLOCK_N, D]
            v = v_desc.load([start, col])
            k, v = _upcast_kv(k, v, KV_FP8, FP8_DOT, CDTYPE)
            s = tl.dot(q, k.T, input_precision=PRECISION)
            if MASKED:
                s = tl.where(((start + offs_n) < hi)[None, :], s, float("-inf"))
        else:
            if MASKED:
                n_ok = (start + offs_n) < hi
                k = tl.load(k_ptrs, mask=n_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            k, v = _upcast_kv(k, v, KV_FP8, FP8_DOT, CDTYPE)
            s = tl.dot(q, k, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            if MASKED:
                s = tl.where(n_ok[None, :], s, float("-inf"))
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
        vs = None
        if PER_TOKEN:  # e4m3 scales per key: K's on its score column, V's on its weight
            sc_ok = (start + offs_n) < hi
            s = s * tl.load(k_scale_ptr + sc_ptrs, mask=sc_ok, other=1.0)[None, :]
            vs = tl.load(v_scale_ptr + sc_ptrs, mask=sc_ok, other=0.0)
            sc_ptrs += BLOCK_N * stride_sc
        acc, m_i, l_i = _softmax_pv(acc, m_i, l_i, s, v, qk_scale, PRECISION, vs, PER_TOKEN)
    return acc, m_i, l_i


@triton.jit
def _upcast_kv(k, v, KV_FP8: tl.constexpr, FP8_DOT: tl.constexpr, CDTYPE: tl.constexpr):
    # e4m3 K/V are read as stored (half the bytes of bf16) and upcast in registers to the
    # compute dtype; FP8_DOT keeps K in e4m3 for an FP8 tensor-core QK^T (q is e4m3 too).
    if KV_FP8:
        v = v.to(CDTYPE)
        if not FP8_DOT:
            k = k.to(CDTYPE)
    return k, v


@triton.jit
def _grouped_shared_attention_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [S_total, Hkv, D]
    v_ptr,  # [S_total, Hkv, D]
    k_desc,  # TMA descriptors of k/v as [S_total, Hkv * D], or None
    v_desc,
    starts_ptr,  # [C] int32: first pool row of chunk c (its slot)
    ends_ptr,  # [C] int32: end row of chunk c (start + length; start for an absent chunk)
    sel_req_ptr,  # [N] int32
    sel_kv_ptr,  # [N] int32
    sel_chunk_ptr,  # [N] int32
    work_ptr,  # [5, W_max] int32: group start, group selections, row tile, split, splits
    meta_ptr,  # [2] int32: items W, split_len
    o_ptr,  # [N * G, D] q.dtype
    lse_ptr,  # [N * G] fp32
    o_part_ptr,  # [W_max, BLOCK_M, D] fp32 (only items of split tiles)
    lse_part_ptr,  # [W_max, BLOCK_M] fp32
    stride_qb,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    W,
    qk_scale,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    WARP_SPEC: tl.constexpr,
    PRECISION: tl.constexpr,
    PERSISTENT: tl.constexpr,
    k_scale_ptr=None,  # [C, Hkv] fp32: scale of an e4m3 chunk's keys (KV_FP8), else None
    v_scale_ptr=None,  # [C, Hkv] fp32: scale of its values
    stride_sc=0,
    KV_FP8: tl.constexpr = False,
    FP8_DOT: tl.constexpr = False,
    CDTYPE: tl.constexpr = None,
    PER_TOKEN: tl.constexpr = False,  # scales [S_total, Hkv]: one per pool row and KV head
    chunk_scale_ptr=None,  # [C] fp32: factor on the softmax scale of chunk c (CHUNK_SCALE)
    CHUNK_SCALE: tl.constexpr = False,
    HALF_TAIL: tl.constexpr = False,  # a tile of <= BLOCK_M / 2 rows runs BLOCK_M / 2 rows
    PIPE_QK: tl.constexpr = False,  # QK^T one key block ahead (shared_attention_pipe.py)
):
    # One work item per program; PERSISTENT: a capped grid whose programs loop over the
    # items, so the kernel can leave room on each SM for a concurrent kernel.
    n_items = tl.load(meta_ptr)  # the grid is an upper bound on the items
    if PERSISTENT:
        for w in range(tl.program_id(0), n_items, tl.num_programs(0)):
            # fmt: off
            _item_rows(
                w, q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr,
                sel_kv_ptr, sel_chunk_ptr, work_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
                stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, W, qk_scale,
                G, D, BLOCK_M, BLOCK_N, USE_TMA, WARP_SPEC, PRECISION,
                k_scale_ptr, v_scale_ptr, stride_sc, KV_FP8, FP8_DOT, CDTYPE, PER_TOKEN,
                chunk_scale_ptr, CHUNK_SCALE, HALF_TAIL, PIPE_QK,
            )
            # fmt: on
    else:
        w = tl.program_id(0)
        if w < n_items:
            # fmt: off
            _item_rows(
                w, q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr,
                sel_kv_ptr, sel_chunk_ptr, work_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
                stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, W, qk_scale,
                G, D, BLOCK_M, BLOCK_N, USE_TMA, WARP_SPEC, PRECISION,
                k_scale_ptr, v_scale_ptr, stride_sc, KV_FP8, FP8_DOT, CDTYPE, PER_TOKEN,
                chunk_scale_ptr, CHUNK_SCALE, HALF_TAIL, PIPE_QK,
            )
            # fmt: on


# fmt: off
@triton.jit
def _item_rows(
    w, q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr,
    sel_chunk_ptr, work_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, W, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, PRECISION: tl.constexpr,
    k_scale_ptr, v_scale_ptr, stride_sc,
    KV_FP8: tl.constexpr, FP8_DOT: tl.constexpr, CDTYPE: tl.constexpr, PER_TOKEN: tl.constexpr,
    chunk_scale_ptr, CHUNK_SCALE: tl.constexpr, HALF_TAIL: tl.constexpr, PIPE_QK: tl.constexpr,
):
    # HALF_TAIL: the last tile of a group is its rows modulo BLOCK_M; when those fit in half
    # a tile it computes BLOCK_M / 2 rows (one 64-row warpgroup MMA of a 128-row tile, not
    # two), so a group of 150 rows costs 128 + 64 rows of tensor-core work instead of 256.
    # Rows of a large-B group vary around their mean (Binomial): at 128 +- 22 rows, 128-row
    # tiles ran 69% useful rows, 128 + 64 runs 81% (like 64-row tiles, at the 128-row rate).
    tail = BLOCK_M  # rows of this tile, when HALF_TAIL asks
    if HALF_TAIL:
        tail = tl.load(work_ptr + W + w) * G - tl.load(work_ptr + 2 * W + w) * BLOCK_M
    if tail <= BLOCK_M // 2:
        _shared_item(
            w, q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr,
            sel_kv_ptr, sel_chunk_ptr, work_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
            stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, W, qk_scale,
            G, D, BLOCK_M // 2, BLOCK_N, USE_TMA, WARP_SPEC, PRECISION,
            k_scale_ptr, v_scale_ptr, stride_sc, KV_FP8, FP8_DOT, CDTYPE, PER_TOKEN,
            chunk_scale_ptr, CHUNK_SCALE, BLOCK_M, PIPE_QK,
        )
    else:
        _shared_item(
            w, q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr,
            sel_kv_ptr, sel_chunk_ptr, work_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
            stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, W, qk_scale,
            G, D, BLOCK_M, BLOCK_N, USE_TMA, WARP_SPEC, PRECISION,
            k_scale_ptr, v_scale_ptr, stride_sc, KV_FP8, FP8_DOT, CDTYPE, PER_TOKEN,
            chunk_scale_ptr, CHUNK_SCALE, BLOCK_M, PIPE_QK,
        )


@triton.jit
def _shared_item(
    w, q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr,
    sel_chunk_ptr, work_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, W, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, PRECISION: tl.constexpr,
    k_scale_ptr, v_scale_ptr, stride_sc,
    KV_FP8: tl.constexpr, FP8_DOT: tl.constexpr, CDTYPE: tl.constexpr, PER_TOKEN: tl.constexpr,
    chunk_scale_ptr, CHUNK_SCALE: tl.constexpr, TILE_M: tl.constexpr, PIPE_QK: tl.constexpr,
):
    # fmt: on
    # TILE_M: the work list's rows per tile; BLOCK_M (<= TILE_M) of them are computed
    # work item w: one row tile of one (chunk, KV head) group, over one split of the chunk
    start = tl.load(work_ptr + w)
    n_sel = tl.load(work_ptr + W + w)
    tile = tl.load(work_ptr + 2 * W + w)
    split = tl.load(work_ptr + 3 * W + w)
    n_split = tl.load(work_ptr + 4 * W + w)
    chunk = tl.load(sel_chunk_ptr + start)
    kv = tl.load(sel_kv_ptr + start)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    rows = tile * TILE_M + offs_m  # row of the group: selection rows // G, head rows % G
    row_ok = rows < n_sel * G
    req = tl.load(sel_req_ptr + start + rows // G, mask=row_ok, other=0)
    head = kv * G + rows % G
    q = tl.load(
        q_ptr + req[:, None].to(tl.int64) * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )

    if CHUNK_SCALE:  # the chunk's own softmax temperature (a composed part's APE 1/T)
        qk_scale = qk_scale * tl.load(chunk_scale_ptr + chunk)
    if KV_FP8:  # one scale per (chunk, KV head): K's folds into the logit scale
        if not PER_TOKEN:
            qk_scale = qk_scale * tl.load(k_scale_ptr + chunk * stride_sc + kv)
        if FP8_DOT:  # q to e4m3 with one scale per tile (e4m3 keeps 2^-4 relative error)
            q_s = tl.maximum(tl.max(tl.abs(q.to(tl.float32))), 1e-30) / 448.0
            q = (q.to(tl.float32) / q_s).to(tl.float8e4nv)
            qk_scale = qk_scale * q_s

    c_lo = tl.load(starts_ptr + chunk)  # the chunk's rows in the pool (slot table)
    c_hi = tl.load(ends_ptr + chunk)
    # this group's split length: the chunk cut into n_split parts, rounded up to BLOCK_N
    split_len = tl.cdiv(tl.cdiv(c_hi - c_lo, n_split), BLOCK_N) * BLOCK_N
    lo = tl.minimum(c_lo + split * split_len, c_hi)
    hi = tl.minimum(lo + split_len, c_hi)
    full_hi = lo + (tl.maximum(hi - lo, 0) // BLOCK_N) * BLOCK_N
    k_ptrs = (
        k_ptr
        + lo.to(tl.int64) * stride_kn
        + kv * stride_kh
        + (offs_n[None, :] * stride_kn + offs_d[:, None])
    )
    v_ptrs = (
        v_ptr
        + lo.to(tl.int64) * stride_vn
        + kv * stride_vh
        + (offs_n[:, None] * stride_vn + offs_d[None, :])
    )

    sc_ptrs = (lo + offs_n).to(tl.int64) * stride_sc + kv  # per-token scales (PER_TOKEN)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if PIPE_QK:  # bf16/fp16/fp32 K/V only (the launcher checks)
        acc, m_i, l_i = _chunk_attn_inner_pipe(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, k_desc, v_desc, kv * D, lo, full_hi, qk_scale,
            stride_kn, stride_vn, BLOCK_N, USE_TMA, PRECISION,
        )  # fmt: skip
    else:
        acc, m_i, l_i = _chunk_attn_inner(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, k_desc, v_desc, kv * D, lo, full_hi, qk_scale,
            stride_kn, stride_vn, BLOCK_N, False, USE_TMA, WARP_SPEC, PRECISION, KV_FP8,
            FP8_DOT, CDTYPE, PER_TOKEN, sc_ptrs, k_scale_ptr, v_scale_ptr, stride_sc,
        )  # fmt: skip
    if full_hi < hi:
        k_ptrs += (full_hi - lo).to(tl.int64) * stride_kn
        v_ptrs += (full_hi - lo).to(tl.int64) * stride_vn
        acc, m_i, l_i = _chunk_attn_inner(
            acc,
            m_i,
            l_i,
            q,
            k_ptrs,
            v_ptrs,
            k_desc,
            v_desc,
            kv * D,
            full_hi,
            hi,
            qk_scale,
            stride_kn,
            stride_vn,
            BLOCK_N,
            True,
            USE_TMA,
            False,
            PRECISION,
            KV_FP8,
            FP8_DOT,
            CDTYPE,
            PER_TOKEN,
            sc_ptrs + (full_hi - lo).to(tl.int64) * stride_sc,
            k_scale_ptr,
            v_scale_ptr,
            stride_sc,
        )

    o, lse = merge_finish(m_i, l_i, acc)  # an empty chunk or split gives (0, -inf)
    if KV_FP8 and not PER_TOKEN:  # V's scale: o is linear in V, also before a split's merge
        o = o * tl.load(v_scale_ptr + chunk * stride_sc + kv)
    if n_split == 1:
        out_rows = (start * G + rows).to(tl.int64)
        tl.store(
            o_ptr + out_rows[:, None] * D + offs_d[None, :],
            o.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )
        tl.store(lse_ptr + out_rows, lse, mask=row_ok)
    else:
        part = w.to(tl.int64) * TILE_M + offs_m
        tl.store(o_part_ptr + part[:, None] * D + offs_d[None, :], o)
        tl.store(lse_part_ptr + part, lse)
