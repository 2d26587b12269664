"""Grouped shared-chunk attention: the MoSKA kernel.

Every selection i = (req, kv_head, chunk) asks for the attention of the G query heads of
KV head `kv_head` of request `req` over the keys of chunk `chunk` (no mask). Selections are
sorted by (chunk, kv_head, req), so the selections of one (chunk, kv_head) pair, a *group*,
are contiguous and their query rows are rows `start*G : (start+n)*G` of the flat output
[N*G, D]. A group's rows are cut into tiles of BLOCK_M rows (a tile may end inside a
request when G does not divide BLOCK_M: rows are independent), so one K/V block read from
the chunk serves BLOCK_M query rows through a matrix product, as a fused MoE kernel serves
an expert's token tile.

One launch runs over a work list of items (group, row tile, split). A long chunk with few
tiles is split along the sequence (split-KV) so that the launch still has enough programs
to fill the GPU; the partial states of a split tile go to a scratch buffer and a second,
small kernel merges them exactly by log-sum-exp. The work list is built on the device with
torch ops and no host sync: the grid is an upper bound on the number of items computed
from host-known sizes, and programs past the last item return at once (CUDA-graph safe).
"""

import torch
import triton
import triton.language as tl

from .merge import merge_finish
from .shared_inputs import (
    ChunkTable,
    check_inputs,
    chunk_table,
    fp8_kernel_args,
    outputs,
    pool_descriptor,
    tma_ok,
)
from .shared_split_merge import merge_tile_splits
from .shared_tuning import INTERPRETER, grouped_tuning
from .shared_work_list import build_work_list

LOG2E = 1.4426950408889634


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
def _softmax_pv(
    acc, m_i, l_i, s, v, qk_scale, PRECISION: tl.constexpr, vs=None, PER_TOKEN: tl.constexpr = False
):
    # One online-softmax step: scores s [BLOCK_M, BLOCK_N] (unscaled), values v [BLOCK_N, D];
    # PER_TOKEN: vs [BLOCK_N], each value row's e4m3 scale, weighs p in the product only.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    pv = p
    if PER_TOKEN:
        pv = p * vs[None, :]
    acc = acc * alpha[:, None] + tl.dot(pv.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


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
):
    # One work item per program; PERSISTENT: a capped grid whose programs loop over the
    # items, so the kernel can leave room on each SM for a concurrent kernel.
    n_items = tl.load(meta_ptr)  # the grid is an upper bound on the items
    if PERSISTENT:
        for w in range(tl.program_id(0), n_items, tl.num_programs(0)):
            # fmt: off
            _shared_item(
                w, q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr,
                sel_kv_ptr, sel_chunk_ptr, work_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
                stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, W, qk_scale,
                G, D, BLOCK_M, BLOCK_N, USE_TMA, WARP_SPEC, PRECISION,
                k_scale_ptr, v_scale_ptr, stride_sc, KV_FP8, FP8_DOT, CDTYPE, PER_TOKEN,
            )
            # fmt: on
    else:
        w = tl.program_id(0)
        if w < n_items:
            # fmt: off
            _shared_item(
                w, q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr,
                sel_kv_ptr, sel_chunk_ptr, work_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
                stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, W, qk_scale,
                G, D, BLOCK_M, BLOCK_N, USE_TMA, WARP_SPEC, PRECISION,
                k_scale_ptr, v_scale_ptr, stride_sc, KV_FP8, FP8_DOT, CDTYPE, PER_TOKEN,
            )
            # fmt: on


# fmt: off
@triton.jit
def _shared_item(
    w, q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr,
    sel_chunk_ptr, work_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, W, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, PRECISION: tl.constexpr,
    k_scale_ptr, v_scale_ptr, stride_sc,
    KV_FP8: tl.constexpr, FP8_DOT: tl.constexpr, CDTYPE: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    # fmt: on
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
    rows = tile * BLOCK_M + offs_m  # row of the group: selection rows // G, head rows % G
    row_ok = rows < n_sel * G
    req = tl.load(sel_req_ptr + start + rows // G, mask=row_ok, other=0)
    head = kv * G + rows % G
    q = tl.load(
        q_ptr + req[:, None].to(tl.int64) * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )

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
        lo,
        full_hi,
        qk_scale,
        stride_kn,
        stride_vn,
        BLOCK_N,
        False,
        USE_TMA,
        WARP_SPEC,
        PRECISION,
        KV_FP8,
        FP8_DOT,
        CDTYPE,
        PER_TOKEN,
        sc_ptrs,
        k_scale_ptr,
        v_scale_ptr,
        stride_sc,
    )
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
        part = w.to(tl.int64) * BLOCK_M + offs_m
        tl.store(o_part_ptr + part[:, None] * D + offs_d[None, :], o)
        tl.store(lse_part_ptr + part, lse)


def _default_config(d: int, g: int, device: torch.device, rows_per_group: float) -> dict:
    # the tile of this shape from the table of moska/kernels/shared_tuning.py (measured per
    # head dim, GQA ratio and rows per group); the interpreter runs few, large programs
    if device.type != "cuda":
        return INTERPRETER.launch_config(sms=1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return grouped_tuning(d, g, rows_per_group).launch_config(sms)


def grouped_shared_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_pool: torch.Tensor,  # [S_total, Hkv, D]
    v_pool: torch.Tensor,  # [S_total, Hkv, D]
    chunk_offsets: torch.Tensor | ChunkTable,  # [C + 1] int32, or a slot table
    sel,  # Selections: req, kv_head, chunk [N] int32, sorted by (chunk, kv_head, req)
    sm_scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    target_programs: int | None = None,
    min_split: int | None = None,
    use_tma: bool | None = None,
    warp_specialize: bool | None = None,
    merge_m: int | None = None,
    split_b: int | None = None,
    max_programs: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    fp8_dot: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each selection's G query rows over its chunk: (o [N,G,D] q.dtype, lse [N,G] fp32).

    e4m3 pools (float8_e4m3fn) need `kv_scales` = (k_scale, v_scale) fp32, [S_total, Hkv]
    (one per pool row and KV head, addressed like the rows) or [C, Hkv] (one per chunk and
    KV head): a value is the stored one times its scale. K/V are upcast in registers, or
    with `fp8_dot` q is cut to e4m3 per tile and QK^T runs on FP8 tensor cores.

    `chunk_offsets`: chunk c is pool rows `offsets[c] : offsets[c+1]`, or a `ChunkTable`
    (starts [C], ends [C]): rows `starts[c] : ends[c]` (a tiered library's GPU slots;
    an absent chunk has ends == starts and gives (0, -inf)).
    `out` = (o, lse) preallocated contiguous outputs, optional. Block sizes, warps, stages
    and the split heuristic (`target_programs` items, splits of at least `min_split` tokens)
    may be overridden, e.g. by tests and benchmarks. `merge_m` rows and `split_b` partials
    per step set the shape of the merge of split tiles. `max_programs` caps the grid (its
    programs then loop over the work items), to leave room beside a concurrent kernel.
    """
    table = chunk_table(chunk_offsets)  # offsets: views, no copy
    check_inputs(q, k_pool, v_pool, table, sel)
    fp8 = fp8_kernel_args(q, k_pool, v_pool, kv_scales, table, fp8_dot)
    _, hq, d = q.shape
    hkv = k_pool.shape[1]
    g = hq // hkv
    n = sel.req.numel()
    o, lse = outputs(out, (n, g, d), q.dtype, q.device)
    if n == 0:
        return o, lse
    # average rows of a (chunk, kv_head) group if every pair were touched: host-known sizes only
    cfg = _default_config(d, g, q.device, n * g / max(1, min(n, table.starts.numel() * hkv)))
    for k_, v_ in (
        ("block_m", block_m),
        ("block_n", block_n),
        ("num_warps", num_warps),
        ("num_stages", num_stages),
        ("target_programs", target_programs),
        ("min_split", min_split),
        ("use_tma", use_tma),
        ("warp_specialize", warp_specialize),
        ("merge_m", merge_m),
        ("split_b", split_b),
    ):
        if v_ is not None:
            cfg[k_] = v_
    for k_ in ("block_m", "block_n", "merge_m", "split_b"):
        if cfg[k_] < 1 or cfg[k_] & (cfg[k_] - 1):
            raise ValueError(f"{k_} must be a power of two, got {cfg[k_]}")
    work, meta, w_max = build_work_list(
        sel,
        table,
        hkv,
        g,
        cfg["block_m"],
        cfg["block_n"],
        cfg["target_programs"],
        cfg["min_split"],
    )
    o_part = torch.empty(w_max, cfg["block_m"], d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(w_max, cfg["block_m"], device=q.device, dtype=torch.float32)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    k_desc = v_desc = None
    if cfg["use_tma"] and tma_ok(k_pool, v_pool):
        k_desc = pool_descriptor(k_pool, cfg["block_n"])
        v_desc = pool_descriptor(v_pool, cfg["block_n"])
    grid = w_max if max_programs is None else max(1, min(w_max, max_programs))
    _grouped_shared_attention_kernel[(grid,)](
        q,
        k_pool,
        v_pool,
        k_desc,
        v_desc,
        table.starts,
        table.ends,
        sel.req,
        sel.kv_head,
        sel.chunk,
        work,
        meta,
        o,
        lse,
        o_part,
        lse_part,
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        v_pool.stride(0),
        v_pool.stride(1),
        w_max,
        sm_scale * LOG2E,
        G=g,
        D=d,
        BLOCK_M=cfg["block_m"],
        BLOCK_N=cfg["block_n"],
        USE_TMA=k_desc is not None,
        WARP_SPEC=cfg["warp_specialize"],
        PRECISION=precision,
        PERSISTENT=max_programs is not None,
        **fp8,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    merge_tile_splits(
        work, meta, o_part, lse_part, o, lse, g, cfg["block_m"], cfg["merge_m"], cfg["split_b"]
    )
    return o, lse


def grouped_shared_attention_ref(q, k_pool, v_pool, chunk_offsets, sel, sm_scale, kv_scales=None):
    """Plain-PyTorch reference, one selection at a time in fp32: (o [N,G,D] fp32, lse [N,G] fp32).
    `kv_scales` (k_scale, v_scale) [C, Hkv]: an e4m3 chunk's K/V are stored values x scale."""
    if (k_pool.dtype == torch.float8_e4m3fn) != (kv_scales is not None):
        raise ValueError("kv_scales go with float8_e4m3fn pools, and only with them")
    n = sel.req.numel()
    hq, d = q.shape[1], q.shape[2]
    g = hq // k_pool.shape[1]
    o = torch.zeros(n, g, d, dtype=torch.float32, device=q.device)
    lse = torch.full((n, g), float("-inf"), dtype=torch.float32, device=q.device)
    table = chunk_table(chunk_offsets)
    starts, ends = table.starts.tolist(), table.ends.tolist()
    for i, (r, h, c) in enumerate(zip(sel.req.tolist(), sel.kv_head.tolist(), sel.chunk.tolist())):
        k = k_pool[starts[c] : ends[c], h].float()  # [L, D]
        v = v_pool[starts[c] : ends[c], h].float()
        if kv_scales is not None and kv_scales[0].shape[0] == k_pool.shape[0]:  # per token
            rows = slice(starts[c], ends[c])
            k = k * kv_scales[0][rows, h, None].float()
            v = v * kv_scales[1][rows, h, None].float()
        elif kv_scales is not None:  # per (chunk, KV head)
            k, v = k * kv_scales[0][c, h].float(), v * kv_scales[1][c, h].float()
        if k.shape[0] == 0:
            continue
        s = q[r, h * g : (h + 1) * g].float() @ k.T * sm_scale  # [G, L]
        lse[i] = torch.logsumexp(s, -1)
        o[i] = torch.softmax(s, -1) @ v
    return o, lse
