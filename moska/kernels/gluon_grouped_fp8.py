"""Grouped shared-chunk attention over an e4m3 library in Gluon for Hopper: FA3's ping-pong
schedule on FP8 tensor cores (issue 16's 1.6x). An experiment beside the Triton FP8 program
(`shared_attention_fp8.py`), not wired in: `python -m moska.bench.fp8_gluon` checks and times it.

Why: the Triton FP8 program holds 252-255 registers, so one 4-warp program runs an SM and
its two products and its softmax run one after another (docs/performance-notes.md, "FP8
library KV"). Here two consumer warpgroups of 64 rows share each K/V block and take turns on
the tensor cores (`gluon_parts`' bf16 ping-pong, `gluon_grouped.py`'s work list), so one's
softmax runs beside the other's products, and a loader warp streams the blocks by TMA.

The library form is `library/fp8.py`'s "block" scales (one per 128 rows from each chunk's
start, per KV head, stored per row [S, Hkv]) with V read token-major ([Hkv * D, S], the B
operand FP8 wgmma wants for P V). With 128-key blocks every block has one K and one V scale:
    QK^T: s = dot(q8, k8^T) in fp32; q = q8 * q_s[row]; the logit scale per row and block is
          q_s[row] * k_s[block] * sm_scale (positive, so the running max is taken on s raw);
    P V:  the weights come out of exp2 2^P_LOG2 up (e4m3 keeps small ones), are cut to e4m3
          and multiply v8; the accumulator is kept in units of the pending block's V scale, so
          moving to the next block multiplies it by alpha * v_s[prev] / v_s[next], the rescale
          it gets anyway, and the epilogue by the last block's v_s. l sums the same scaled
          weights, so 2^P_LOG2 cancels in o = acc / l; lse takes it off.
q is cut to e4m3 per row by the launcher (torch). Imports only the Gluon modules beside it.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .gluon_grouped import WS_LOADER_REGS, WS_REGS, _item, _stage_q, _store_rows
from .gluon_parts import LOG2E, WS_MAXNREG, _turn_parity, _ws_idle

__all__ = ["check_inputs", "gluon_grouped_fp8_attention", "quantize_rows"]

P_LOG2 = gl.constexpr(8.0)
E4M3_MAX = 448.0


@gluon.constexpr_function
def _mma8_layout(n, num_warps):
    # the warps tile M (16 rows a warp); FP8 wgmma takes 32 of K an instruction
    return gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 32]
    )


@gluon.jit
def _softmax8(s, m_i, l_i, start, hi, qk, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    # online softmax of one raw score block (log2 domain): qk [BLOCK_M] > 0 is the row's
    # logit scale times the block's K scale, so the max is taken on the raw scores
    if start + BLOCK_N > hi:
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where((start + offs_n < hi)[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk)
    p = gl.exp2(s * qk[:, None] - (m_new - P_LOG2)[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _fp8_blocks(q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, lo, hi, n_blocks, qk_row,
                ks_ptr, vs_ptr, kv, Hkv, pp, c0, t0, na, D: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr):  # fmt: skip
    # one consumer warpgroup's key loop (n_blocks >= 1) over its 64 rows: `gluon_parts._ws_blocks`
    # on e4m3 operands, with the per-block K and V scales (module docstring); (acc, m_i, l_i)
    s_layout: gl.constexpr = _mma8_layout(BLOCK_N, 4)
    o_layout: gl.constexpr = _mma8_layout(D, 4)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    nxt = (WG + 1) % na
    slot = c0 % STAGES
    mbarrier.wait(turn.index(WG), _turn_parity(t0, WG), pred=pp)
    mbarrier.wait(k_bar.index(slot), (c0 // STAGES) & 1)
    s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)  # fmt: skip
    mbarrier.arrive(turn.index(nxt), count=1, pred=pp)
    k_s = gl.load(ks_ptr + lo * Hkv + kv)
    v_s = gl.load(vs_ptr + lo * Hkv + kv)  # the pending block's V scale (acc's unit)
    # the next block's scales, loaded one block ahead (an L2 round trip per block otherwise
    # sits between the products and the softmax)
    ahead = gl.minimum(lo + BLOCK_N, hi - 1)
    k_next = gl.load(ks_ptr + ahead * Hkv + kv)
    v_next = gl.load(vs_ptr + ahead * Hkv + kv)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
    p, alpha, m_i, l_i = _softmax8(s, m_i, l_i, lo, hi, qk_row * k_s, BLOCK_N, s_layout)
    for i in range(1, n_blocks):
        c = c0 + i
        slot = c % STAGES
        prev = (c - 1) % STAGES
        start = lo + i * BLOCK_N
        k_s = k_next
        v_cur = v_next
        ahead = gl.minimum(start + BLOCK_N, hi - 1)
        k_next = gl.load(ks_ptr + ahead * Hkv + kv)
        v_next = gl.load(vs_ptr + ahead * Hkv + kv)
        mbarrier.wait(turn.index(WG), _turn_parity(t0 + i, WG), pred=pp)
        mbarrier.wait(k_bar.index(slot), (c // STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)  # fmt: skip
        mbarrier.wait(v_bar.index(prev), ((c - 1) // STAGES) & 1)
        p_op = gl.convert_layout(p.to(gl.float8e4nv), p_layout)
        acc_tok = warpgroup_mma(p_op, v_smem.index(prev).permute((1, 0)), acc, is_async=True)
        mbarrier.arrive(turn.index(nxt), count=1, pred=pp)
        s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, acc_tok))
        p, alpha, m_i, l_i = _softmax8(s, m_i, l_i, start, hi, qk_row * k_s, BLOCK_N, s_layout)
        mbarrier.arrive(empty.index(prev), count=1)  # block i - 1 is read
        acc = acc * gl.convert_layout(alpha * (v_s / v_cur), row_o)[:, None]
        v_s = v_cur
    c = c0 + n_blocks - 1
    last = c % STAGES
    mbarrier.wait(turn.index(WG), _turn_parity(t0 + n_blocks, WG), pred=pp)
    mbarrier.wait(v_bar.index(last), (c // STAGES) & 1)
    p_op = gl.convert_layout(p.to(gl.float8e4nv), p_layout)
    acc_tok = warpgroup_mma(p_op, v_smem.index(last).permute((1, 0)), acc, is_async=True)
    mbarrier.arrive(turn.index(nxt), count=1, pred=pp)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
    mbarrier.arrive(empty.index(last), count=1)
    return acc * v_s, m_i, l_i


@gluon.jit
def _fp8_rows(q_ptr, qs_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, ks_ptr, vs_ptr,
              sel_req_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, Hq,
              Hkv, w, start, n_rows, tile_row0, n_split, kv, lo, hi, n_blocks, pp, c0, t0,
              qk_scale, G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr,
              NWG: gl.constexpr, na):  # fmt: skip
    # one warpgroup's rows of an item: e4m3 q -> shared memory, the key loop, (o, lse) or
    # the split's partial (`gluon_grouped._rows_item`)
    s_layout: gl.constexpr = _mma8_layout(BLOCK_N, 4)
    o_layout: gl.constexpr = _mma8_layout(D, 4)
    r0 = tile_row0 + WG * BLOCK_M
    _stage_q(q_ptr, q_smem, sel_req_ptr, start, r0, n_rows, kv, stride_qb, stride_qh, G, D,
             BLOCK_M)  # fmt: skip
    rows_s = r0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    ok_s = rows_s < n_rows
    req_s = gl.load(sel_req_ptr + start + rows_s // G, mask=ok_s, other=0)
    q_s = gl.load(qs_ptr + req_s * Hq + kv * G + rows_s % G, mask=ok_s, other=1.0)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    if n_blocks > 0:  # an absent chunk (a tiered library's empty slot) has none
        acc, m_i, l_i = _fp8_blocks(q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, lo, hi,
                                    n_blocks, q_s * qk_scale, ks_ptr, vs_ptr, kv, Hkv, pp, c0, t0,
                                    na, D, BLOCK_M, BLOCK_N, STAGES, WG)  # fmt: skip
    _store_rows(acc, m_i, l_i, P_LOG2, r0, w, start, n_rows, tile_row0, n_split, o_ptr, lse_ptr,
                o_part_ptr, lse_part_ptr, G, D, BLOCK_M, NWG, o_layout)  # fmt: skip


@gluon.jit
def _fp8_consumer(q_ptr, qs_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, ks_ptr,
                  vs_ptr, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr, sel_chunk_ptr, work_ptr,
                  meta_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, Hq,
                  Hkv, W, qk_scale, G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr):  # fmt: skip
    # consumer warpgroup WG of two over this program's items (`gluon_grouped._grouped_consumer`)
    c = 0  # key blocks this program streamed so far
    t = 0  # turns this warpgroup took so far
    for w in range(gl.program_id(0), gl.load(meta_ptr), gl.num_programs(0)):
        start, n_rows, tile_row0, n_split, kv, lo, hi, n_blocks = _item(
            w, work_ptr, starts_ptr, ends_ptr, sel_chunk_ptr, sel_kv_ptr, W, G, BLOCK_M,
            BLOCK_N, 2,
        )  # fmt: skip
        na = gl.minimum(gl.cdiv(n_rows - tile_row0, BLOCK_M), 2)  # warpgroups with rows
        pp = na > 1
        active = tile_row0 + WG * BLOCK_M < n_rows
        if WG == 0:
            _fp8_rows(q_ptr, qs_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, ks_ptr,
                      vs_ptr, sel_req_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, stride_qb,
                      stride_qh, Hq, Hkv, w, start, n_rows, tile_row0, n_split, kv, lo, hi,
                      n_blocks, pp, c, t, qk_scale, G, D, BLOCK_M, BLOCK_N, STAGES, WG, 2,
                      na)  # fmt: skip
        else:
            if active:
                _fp8_rows(q_ptr, qs_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn,
                          ks_ptr, vs_ptr, sel_req_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
                          stride_qb, stride_qh, Hq, Hkv, w, start, n_rows, tile_row0, n_split,
                          kv, lo, hi, n_blocks, pp, c, t, qk_scale, G, D, BLOCK_M, BLOCK_N,
                          STAGES, WG, 2, na)  # fmt: skip
            else:
                _ws_idle(k_bar, v_bar, empty, n_blocks, STAGES, False, c)
        c += n_blocks
        t += gl.where(active & pp & (n_blocks > 0), n_blocks + 1, 0)


@gluon.jit
def _fp8_consumer1(q_ptr, qs_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, ks_ptr,
                   vs_ptr, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr, sel_chunk_ptr,
                   work_ptr, meta_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, stride_qb,
                   stride_qh, Hq, Hkv, W, qk_scale, G: gl.constexpr, D: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr):  # fmt: skip
    _fp8_consumer(q_ptr, qs_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, ks_ptr,
                  vs_ptr, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr, sel_chunk_ptr, work_ptr,
                  meta_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, Hq,
                  Hkv, W, qk_scale, G, D, BLOCK_M, BLOCK_N, STAGES, 1)  # fmt: skip


@gluon.jit
def _fp8_loader(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, starts_ptr, ends_ptr,
                sel_chunk_ptr, sel_kv_ptr, work_ptr, meta_ptr, W, G: gl.constexpr,
                D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr):  # fmt: skip
    # one warp: TMA of every item's key blocks into the ring once both consumers freed the
    # slot; K [S, Hkv * D] at (row, kv * D), V token-major [Hkv * D, S] at (kv * D, row)
    c = 0
    for w in range(gl.program_id(0), gl.load(meta_ptr), gl.num_programs(0)):
        _, _, _, _, kv, lo, _, n_blocks = _item(
            w, work_ptr, starts_ptr, ends_ptr, sel_chunk_ptr, sel_kv_ptr, W, G, BLOCK_M,
            BLOCK_N, 2,
        )  # fmt: skip
        for i in range(n_blocks):
            cc = c + i
            slot = cc % STAGES
            row = lo + i * BLOCK_N
            mbarrier.wait(empty.index(slot), ((cc // STAGES) & 1) ^ 1)  # a fresh one passes
            mbarrier.expect(k_bar.index(slot), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [row, kv * D], k_bar.index(slot),
                                            k_smem.index(slot))  # fmt: skip
            mbarrier.expect(v_bar.index(slot), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [kv * D, row], v_bar.index(slot),
                                            v_smem.index(slot))  # fmt: skip
        c += n_blocks


@gluon.jit
def _fp8_ws_kernel(
    q_ptr, qs_ptr, k_desc, v_desc, ks_ptr, vs_ptr, starts_ptr, ends_ptr, sel_req_ptr,
    sel_kv_ptr, sel_chunk_ptr, work_ptr, meta_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh, Hq, Hkv, W, qk_scale, G: gl.constexpr, D: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):  # fmt: skip
    q_lay: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gl.float8e4nv)
    q_smem = gl.allocate_shared_memory(gl.float8e4nv, [2, BLOCK_M, D], q_lay)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, D, BLOCK_N], v_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()
    # fmt: off
    gl.warp_specialize([
        (_fp8_consumer, (q_ptr, qs_ptr, q_smem.index(0), k_smem, v_smem, k_bar, v_bar, empty,
                         turn, ks_ptr, vs_ptr, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr,
                         sel_chunk_ptr, work_ptr, meta_ptr, o_ptr, lse_ptr, o_part_ptr,
                         lse_part_ptr, stride_qb, stride_qh, Hq, Hkv, W, qk_scale, G, D,
                         BLOCK_M, BLOCK_N, STAGES, 0)),
        (_fp8_consumer1, (q_ptr, qs_ptr, q_smem.index(1), k_smem, v_smem, k_bar, v_bar, empty,
                          turn, ks_ptr, vs_ptr, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr,
                          sel_chunk_ptr, work_ptr, meta_ptr, o_ptr, lse_ptr, o_part_ptr,
                          lse_part_ptr, stride_qb, stride_qh, Hq, Hkv, W, qk_scale, G, D,
                          BLOCK_M, BLOCK_N, STAGES)),
        (_fp8_loader, (k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, starts_ptr, ends_ptr,
                       sel_chunk_ptr, sel_kv_ptr, work_ptr, meta_ptr, W, G, D, BLOCK_M, BLOCK_N,
                       STAGES)),
    ], [4, 1], [WS_REGS, WS_LOADER_REGS])
    # fmt: on


def quantize_rows(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, D] -> (e4m3 q8, fp32 scale [B, Hq]): q = q8 * scale, one scale per row."""
    s = q.float().abs().amax(-1).clamp_min(1e-12) / E4M3_MAX
    return (q.float() / s[..., None]).to(torch.float8_e4m3fn), s.contiguous()


def check_inputs(q, k8, v8_t, k_scale, v_scale, block_n: int) -> None:
    """ValueError unless these inputs can run: Hopper (FP8 wgmma: sm_90), q bf16/fp16
    [B, Hq, D], K e4m3 [S, Hkv, D] contiguous, V e4m3 token-major [Hkv, D, S] contiguous,
    fp32 scales [S, Hkv], D in (64, 128), 128-key blocks (one K and V scale a block)."""
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        raise ValueError("the Gluon FP8 program runs on Hopper (sm_90) CUDA tensors only")
    s_total, hkv, d = k8.shape
    if q.dtype not in (torch.float16, torch.bfloat16) or q.dim() != 3 or q.shape[2] != d:
        raise ValueError(f"q must be [B, Hq, {d}] fp16/bf16, got {q.dtype} {tuple(q.shape)}")
    e4m3 = torch.float8_e4m3fn
    if k8.dtype != e4m3 or v8_t.dtype != e4m3 or tuple(v8_t.shape) != (hkv, d, s_total):
        raise ValueError("K must be e4m3 [S, Hkv, D] and V e4m3 token-major [Hkv, D, S]")
    if not (k8.is_contiguous() and v8_t.is_contiguous()) or d not in (64, 128):
        raise ValueError(f"K and V must be contiguous with D in (64, 128), got D = {d}")
    for t in (k_scale, v_scale):
        if t.dtype != torch.float32 or tuple(t.shape) != (s_total, hkv):
            raise ValueError(f"scales must be fp32 [S, Hkv] = {(s_total, hkv)}, got {t.shape}")
    if block_n != 128:
        raise ValueError(f"block_n must be 128 (one scale per 128-row block), got {block_n}")


def _e4m3_desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv)
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], block, layout)


def gluon_grouped_fp8_attention(
    q: torch.Tensor,  # [B, Hq, D] bf16
    k8: torch.Tensor,  # [S_total, Hkv, D] e4m3
    v8_t: torch.Tensor,  # [Hkv, D, S_total] e4m3, token-major
    k_scale: torch.Tensor,  # [S_total, Hkv] fp32, constant over each 128-row block
    v_scale: torch.Tensor,  # [S_total, Hkv] fp32, likewise
    starts: torch.Tensor,  # [C] int32
    ends: torch.Tensor,  # [C] int32
    sel,  # Selections, sorted by (chunk, kv_head, req)
    plan: tuple[torch.Tensor, torch.Tensor, int],  # build_work_list(..., block_m=2 * block_m)
    sm_scale: float,
    *,
    block_m: int = 64,
    block_n: int = 128,
    stages: int = 3,
    programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o [N, G, D] q.dtype, lse [N, G], o_part, lse_part): split tiles' rows are in the
    parts only; the caller merges them (`merge_tile_splits(work, meta, o_part, lse_part, o,
    lse, G, 2 * block_m, ...)`). block_n is the scales' block (128), and chunks start on a
    block. `programs`: a persistent grid of that many programs. `check_inputs` says what
    runs."""
    check_inputs(q, k8, v8_t, k_scale, v_scale, block_n)
    work, meta, w_max = plan
    _, hq, d = q.shape
    s_total, hkv, _ = k8.shape
    g = hq // hkv
    q8, q_s = quantize_rows(q)
    n = sel.req.numel()
    o = torch.empty(n, g, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(n, g, device=q.device, dtype=torch.float32)
    o_part = torch.empty(w_max, 2 * block_m, d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(w_max, 2 * block_m, device=q.device, dtype=torch.float32)
    k_desc = _e4m3_desc(k8.view(s_total, hkv * d), [block_n, d])
    v_desc = _e4m3_desc(v8_t.view(hkv * d, s_total), [d, block_n])
    grid = w_max if programs is None else max(1, min(w_max, programs))
    _fp8_ws_kernel[(grid,)](
        q8, q_s, k_desc, v_desc, k_scale, v_scale, starts, ends, sel.req, sel.kv_head,
        sel.chunk, work, meta, o, lse, o_part, lse_part, q8.stride(0), q8.stride(1), hq, hkv,
        w_max, sm_scale * LOG2E, G=g, D=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
        num_warps=4, maxnreg=WS_MAXNREG,
    )  # fmt: skip
    return o, lse, o_part, lse_part
