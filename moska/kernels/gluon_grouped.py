"""Grouped shared-chunk attention in Gluon for Hopper, FA3's ping-pong schedule (issue 22
item 3): the work list of `shared_work_list.build_work_list` (items = (group, row tile,
split) of NWG * BLOCK_M rows), each item run by NWG (2 or 3) consumer warpgroups of BLOCK_M
rows taking turns on the tensor cores while one loader warp streams the chunk's K/V blocks by
TMA (`gluon_parts._ws_loop`). The warpgroups past a tile's rows only free the slots, like the Triton kernel's half tails. Every partition walks the
items w = program, program + programs, ...: one item a program on a grid of W_max, or a
persistent grid (a program an SM) whose loader streams the next item's first blocks while
the consumers finish the last one's (block and turn counters run on across items). An
experiment beside the Triton kernel, not wired in: `python -m moska.bench.kernels_gluon_grouped`
checks and times it.

Inputs and outputs as `grouped_shared_attention`'s (q [B, Hq, D]; pools [S_total, Hkv, D];
a chunk table of starts / ends; Selections sorted by (chunk, kv_head, req); o [N * G, D],
lse [N * G] fp32); split tiles write (o_part [W_max, NWG * BLOCK_M, D], lse_part) for the
caller's `merge_tile_splits`. Imports only `gluon_parts` beside it.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from .gluon_parts import (
    _LN2,
    LOG2E,
    WS_MAXNREG,
    _descriptor,
    _mma_layout,
    _q_layout,
    _ws_idle,
    _ws_loader,
    _ws_loop,
)

__all__ = ["gluon_grouped_attention"]

# registers a thread: the consumer warpgroups and the loader (which walks the work list);
# 2 x (consumer - 168) = 168 - loader keeps the 168-register launch budget
WS_REGS = gl.constexpr(240)
WS_LOADER_REGS = gl.constexpr(24)
WS3_REGS = gl.constexpr(160)  # three consumers: a launch budget of 128 (16 warps)
WS3_MAXNREG = 128


@gluon.jit
def _item(w, work_ptr, starts_ptr, ends_ptr, sel_chunk_ptr, sel_kv_ptr, W, G: gl.constexpr,
          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NWG: gl.constexpr):  # fmt: skip
    # work item w: (first selection, rows, first row of its tile, KV head, key range, blocks)
    start = gl.load(work_ptr + w)
    n_rows = gl.load(work_ptr + W + w) * G
    tile_row0 = gl.load(work_ptr + 2 * W + w) * (NWG * BLOCK_M)
    split = gl.load(work_ptr + 3 * W + w)
    n_split = gl.load(work_ptr + 4 * W + w)
    chunk = gl.load(sel_chunk_ptr + start)
    kv = gl.load(sel_kv_ptr + start)
    c_lo = gl.load(starts_ptr + chunk)
    c_hi = gl.load(ends_ptr + chunk)
    split_len = gl.cdiv(gl.cdiv(c_hi - c_lo, n_split), BLOCK_N) * BLOCK_N
    lo = gl.minimum(c_lo + split * split_len, c_hi)
    hi = gl.minimum(lo + split_len, c_hi)
    return start, n_rows, tile_row0, n_split, kv, lo, hi, gl.cdiv(hi - lo, BLOCK_N)


@gluon.jit
def _stage_q(q_ptr, q_smem, sel_req_ptr, start, r0, n_rows, kv, stride_qb, stride_qh,
             G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr):  # fmt: skip
    # rows r0.. of an item (selection start + row // G, head kv * G + row % G) -> q_smem,
    # read in place from q [B, Hq, D]; rows past n_rows are zeros
    q_layout: gl.constexpr = _q_layout(D, 4)
    rows = r0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
    ok = rows < n_rows
    req = gl.load(sel_req_ptr + start + rows // G, mask=ok, other=0)
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
    q_off = req.to(gl.int64) * stride_qb + (kv * G + rows % G) * stride_qh
    q = gl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
    q_smem.store(q)
    fence_async_shared()


@gluon.jit
def _store_rows(acc, m_i, l_i, lse_shift, r0, w, start, n_rows, tile_row0, n_split, o_ptr,
                lse_ptr, o_part_ptr, lse_part_ptr, G: gl.constexpr, D: gl.constexpr,
                BLOCK_M: gl.constexpr, NWG: gl.constexpr,
                o_layout: gl.constexpr):  # fmt: skip
    # one warpgroup's rows r0.. of an item: (o, lse) of its selections' rows, or the split's
    # partial; lse = (m + log2 l - lse_shift) ln 2 (lse_shift: a scale the weights carry)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    out = acc / gl.maximum(gl.convert_layout(l_i, row_o), 1e-30)[:, None]
    lse = gl.convert_layout((m_i + gl.log2(l_i) - lse_shift) * _LN2, row_o)
    r = r0 + gl.arange(0, BLOCK_M, layout=row_o)
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    if n_split == 1:
        flat = (start * G + r).to(gl.int64)
        r_ok = r < n_rows
        gl.store(o_ptr + flat[:, None] * D + cols[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=r_ok[:, None])  # fmt: skip
        gl.store(lse_ptr + flat, lse, mask=r_ok)
    else:  # every row of the tile's partial (merge_tile_splits masks the invalid ones)
        part = w.to(gl.int64) * (NWG * BLOCK_M) + (r - tile_row0)
        gl.store(o_part_ptr + part[:, None] * D + cols[None, :], out)
        gl.store(lse_part_ptr + part, lse)


@gluon.jit
def _rows_item(q_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, sel_req_ptr, o_ptr,
               lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, w, start, n_rows,
               tile_row0, n_split, kv, lo, hi, n_blocks, pp, c0, t0, qk_scale,
               G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               STAGES: gl.constexpr, WG: gl.constexpr, OVERLAP: gl.constexpr,
               EXP_BF16: gl.constexpr, KV_APART: gl.constexpr, NWG: gl.constexpr,
               na):  # fmt: skip
    # one warpgroup's rows tile_row0 + WG * BLOCK_M .. of an item (selection start + row // G,
    # head row % G): q -> shared memory, the key loop, (o, lse) or the split's partial
    dt: gl.constexpr = q_ptr.dtype.element_ty
    r0 = tile_row0 + WG * BLOCK_M
    _stage_q(q_ptr, q_smem, sel_req_ptr, start, r0, n_rows, kv, stride_qb, stride_qh, G, D,
             BLOCK_M)  # fmt: skip
    acc, m_i, l_i = _ws_loop(q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, lo, hi, n_blocks,
                             qk_scale, pp, dt, D, BLOCK_M, BLOCK_N, STAGES, WG, OVERLAP, EXP_BF16,
                             KV_APART, True, c0, t0, na)  # fmt: skip
    _store_rows(acc, m_i, l_i, 0.0, r0, w, start, n_rows, tile_row0, n_split, o_ptr, lse_ptr,
                o_part_ptr, lse_part_ptr, G, D, BLOCK_M, NWG,
                _mma_layout(BLOCK_M, D, 4))  # fmt: skip


@gluon.jit
def _grouped_consumer(q_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, starts_ptr,
                      ends_ptr, sel_req_ptr, sel_kv_ptr, sel_chunk_ptr, work_ptr, meta_ptr, o_ptr,
                      lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, W, qk_scale,
                      G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr,
                      OVERLAP: gl.constexpr, EXP_BF16: gl.constexpr, KV_APART: gl.constexpr,
                      NWG: gl.constexpr):  # fmt: skip
    # consumer warpgroup WG of NWG over this program's items: the warpgroups with rows take
    # turns (0 .. na - 1); one without rows only frees the slots
    c = 0  # key blocks this program streamed so far
    t = 0  # turns this warpgroup took so far
    for w in range(gl.program_id(0), gl.load(meta_ptr), gl.num_programs(0)):
        start, n_rows, tile_row0, n_split, kv, lo, hi, n_blocks = _item(
            w,
            work_ptr,
            starts_ptr,
            ends_ptr,
            sel_chunk_ptr,
            sel_kv_ptr,
            W,
            G,
            BLOCK_M,
            BLOCK_N,
            NWG,
        )
        na = gl.minimum(gl.cdiv(n_rows - tile_row0, BLOCK_M), NWG)  # warpgroups with rows
        pp = na > 1
        active = tile_row0 + WG * BLOCK_M < n_rows
        if WG == 0:
            _rows_item(q_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, sel_req_ptr,
                       o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, w, start,
                       n_rows, tile_row0, n_split, kv, lo, hi, n_blocks, pp, c, t, qk_scale, G, D,
                       BLOCK_M, BLOCK_N, STAGES, WG, OVERLAP, EXP_BF16, KV_APART, NWG,
                       na)  # fmt: skip
        else:
            if active:
                _rows_item(q_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, sel_req_ptr,
                           o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, w,
                           start, n_rows, tile_row0, n_split, kv, lo, hi, n_blocks, pp, c, t,
                           qk_scale, G, D, BLOCK_M, BLOCK_N, STAGES, WG, OVERLAP, EXP_BF16,
                           KV_APART, NWG, na)  # fmt: skip
            else:
                _ws_idle(k_bar, v_bar, empty, n_blocks, STAGES, KV_APART, c)
        c += n_blocks
        t += gl.where(active & pp & (n_blocks > 0), n_blocks + 1, 0)


@gluon.jit
def _grouped_consumer1(q_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, starts_ptr,
                       ends_ptr, sel_req_ptr, sel_kv_ptr, sel_chunk_ptr, work_ptr, meta_ptr,
                       o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, W,
                       qk_scale, G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr,
                       EXP_BF16: gl.constexpr, KV_APART: gl.constexpr,
                       NWG: gl.constexpr):  # fmt: skip
    _grouped_consumer(q_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, starts_ptr,
                      ends_ptr, sel_req_ptr, sel_kv_ptr, sel_chunk_ptr, work_ptr, meta_ptr, o_ptr,
                      lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, W, qk_scale, G, D,
                      BLOCK_M, BLOCK_N, STAGES, 1, OVERLAP, EXP_BF16, KV_APART, NWG)  # fmt: skip


@gluon.jit
def _grouped_consumer2(q_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, starts_ptr,
                       ends_ptr, sel_req_ptr, sel_kv_ptr, sel_chunk_ptr, work_ptr, meta_ptr,
                       o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, W,
                       qk_scale, G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr,
                       EXP_BF16: gl.constexpr, KV_APART: gl.constexpr,
                       NWG: gl.constexpr):  # fmt: skip
    _grouped_consumer(q_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, starts_ptr,
                      ends_ptr, sel_req_ptr, sel_kv_ptr, sel_chunk_ptr, work_ptr, meta_ptr, o_ptr,
                      lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, W, qk_scale, G, D,
                      BLOCK_M, BLOCK_N, STAGES, 2, OVERLAP, EXP_BF16, KV_APART, NWG)  # fmt: skip


@gluon.jit
def _grouped_loader(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, starts_ptr, ends_ptr,
                    sel_chunk_ptr, sel_kv_ptr, work_ptr, meta_ptr, W, G: gl.constexpr,
                    D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr, KV_APART: gl.constexpr,
                    NWG: gl.constexpr):  # fmt: skip
    c = 0
    for w in range(gl.program_id(0), gl.load(meta_ptr), gl.num_programs(0)):
        _, _, _, _, kv, lo, _, n_blocks = _item(
            w,
            work_ptr,
            starts_ptr,
            ends_ptr,
            sel_chunk_ptr,
            sel_kv_ptr,
            W,
            G,
            BLOCK_M,
            BLOCK_N,
            NWG,
        )
        _ws_loader(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, lo, kv * D, n_blocks,
                   BLOCK_N, STAGES, KV_APART, c)  # fmt: skip
        c += n_blocks


@gluon.jit
def _grouped_ws_kernel(
    q_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr, sel_chunk_ptr,
    work_ptr, meta_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, W,
    qk_scale, G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, num_warps: gl.constexpr, OVERLAP: gl.constexpr = False,
    EXP_BF16: gl.constexpr = False, KV_APART: gl.constexpr = False, NWG: gl.constexpr = 2,
):  # fmt: skip
    # NWG (2 or 3) consumer warpgroups of BLOCK_M rows share each K/V block of a tile of
    # NWG * BLOCK_M rows; 3 covers a G = 4 group at B = 1,024 (128 +- 22 rows) in one tile
    dt: gl.constexpr = q_ptr.dtype.element_ty
    q_lay: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dt)
    q_smem = gl.allocate_shared_memory(dt, [NWG, BLOCK_M, D], q_lay)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NWG, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
        mbarrier.init(empty.index(i), count=NWG)  # slot i (its K with KV_APART), all consumers
        mbarrier.init(empty.index(STAGES + i), count=NWG)  # V slot i with KV_APART
    for i in gl.static_range(NWG):
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()
    # fmt: off
    if NWG == 3:  # 16 warps (13 used) in 64K registers: 168 / 160 / 160 / 24 a thread
        gl.warp_specialize([
            (_grouped_consumer, (q_ptr, q_smem.index(0), k_smem, v_smem, k_bar, v_bar, empty, turn, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr,
                 sel_chunk_ptr, work_ptr, meta_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
                 stride_qb, stride_qh, W, qk_scale, G, D, BLOCK_M, BLOCK_N, STAGES, 0, OVERLAP, EXP_BF16,
                                 KV_APART, NWG)),
            (_grouped_consumer1, (q_ptr, q_smem.index(1), k_smem, v_smem, k_bar, v_bar, empty, turn, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr,
                 sel_chunk_ptr, work_ptr, meta_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
                 stride_qb, stride_qh, W, qk_scale, G, D, BLOCK_M, BLOCK_N, STAGES, OVERLAP, EXP_BF16,
                                  KV_APART, NWG)),
            (_grouped_consumer2, (q_ptr, q_smem.index(2), k_smem, v_smem, k_bar, v_bar, empty, turn, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr,
                 sel_chunk_ptr, work_ptr, meta_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
                 stride_qb, stride_qh, W, qk_scale, G, D, BLOCK_M, BLOCK_N, STAGES, OVERLAP, EXP_BF16,
                                  KV_APART, NWG)),
            (_grouped_loader, (k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, starts_ptr,
                            ends_ptr, sel_chunk_ptr, sel_kv_ptr, work_ptr, meta_ptr, W, G, D,
                            BLOCK_M, BLOCK_N, STAGES, KV_APART, NWG)),
        ], [4, 4, 1], [WS3_REGS, WS3_REGS, WS_LOADER_REGS])
    else:
        gl.warp_specialize([
            (_grouped_consumer, (q_ptr, q_smem.index(0), k_smem, v_smem, k_bar, v_bar, empty, turn, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr,
                 sel_chunk_ptr, work_ptr, meta_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
                 stride_qb, stride_qh, W, qk_scale, G, D, BLOCK_M, BLOCK_N, STAGES, 0, OVERLAP, EXP_BF16,
                                 KV_APART, NWG)),
            (_grouped_consumer1, (q_ptr, q_smem.index(1), k_smem, v_smem, k_bar, v_bar, empty, turn, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr,
                 sel_chunk_ptr, work_ptr, meta_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
                 stride_qb, stride_qh, W, qk_scale, G, D, BLOCK_M, BLOCK_N, STAGES, OVERLAP, EXP_BF16,
                                  KV_APART, NWG)),
            (_grouped_loader, (k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, starts_ptr,
                            ends_ptr, sel_chunk_ptr, sel_kv_ptr, work_ptr, meta_ptr, W, G, D,
                            BLOCK_M, BLOCK_N, STAGES, KV_APART, NWG)),
        ], [4, 1], [WS_REGS, WS_LOADER_REGS])
    # fmt: on


def gluon_grouped_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_pool: torch.Tensor,  # [S_total, Hkv, D]
    v_pool: torch.Tensor,
    starts: torch.Tensor,  # [C] int32
    ends: torch.Tensor,  # [C] int32
    sel,  # Selections (req, kv_head, chunk [N] int32), sorted by (chunk, kv_head, req)
    plan: tuple[torch.Tensor, torch.Tensor, int],  # build_work_list(..., block_m=nwg * block_m)
    sm_scale: float,
    *,
    block_m: int = 64,
    block_n: int = 128,
    stages: int = 2,
    overlap: bool = False,
    exp_bf16: bool = False,
    kv_apart: bool = False,
    programs: int | None = None,
    nwg: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o [N, G, D], lse [N, G], o_part, lse_part): split tiles' rows are in the parts only;
    the caller merges them (`merge_tile_splits(work, meta, o_part, lse_part, o, lse, G,
    nwg * block_m, ...)`). `overlap`: FA3's intra-warpgroup overlap too (`_ws_loop`); `exp_bf16`: exp2 two at a time in
    bf16 (`_softmax`); `kv_apart`: K and V slots freed apart (`_ws_loader`). `programs`:
    a persistent grid of that many programs (e.g. the SM count), else one item a program.
    `nwg`: consumer warpgroups a program (2, or 3 for tiles of 3 * block_m rows)."""
    work, meta, w_max = plan
    _, hq, d = q.shape
    hkv = k_pool.shape[1]
    g = hq // hkv
    n = sel.req.numel()
    o = torch.empty(n, g, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(n, g, device=q.device, dtype=torch.float32)
    if nwg not in (2, 3):
        raise ValueError(f"nwg must be 2 or 3, got {nwg}")
    o_part = torch.empty(w_max, nwg * block_m, d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(w_max, nwg * block_m, device=q.device, dtype=torch.float32)
    grid = w_max if programs is None else max(1, min(w_max, programs))
    _grouped_ws_kernel[(grid,)](
        q, _descriptor(k_pool, block_n), _descriptor(v_pool, block_n), starts, ends, sel.req,
        sel.kv_head, sel.chunk, work, meta, o, lse, o_part, lse_part, q.stride(0), q.stride(1),
        w_max, sm_scale * LOG2E, G=g, D=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
        num_warps=4, maxnreg=WS_MAXNREG if nwg == 2 else WS3_MAXNREG, OVERLAP=overlap,
        EXP_BF16=exp_bf16, KV_APART=kv_apart, NWG=nwg,
    )  # fmt: skip
    return o, lse, o_part, lse_part
