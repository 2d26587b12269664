"""One shared chunk read by every KV head of B requests, written in Gluon for Hopper (issue 22
item 4: Triton's lower-level dialect, explicit shared memory, TMA, mbarriers and async
warpgroup MMA). An experiment beside the Triton kernel (`shared_one_chunk.py`): not wired
into the dispatcher; `python -m moska.bench.kernels_gluon` checks and times it on an H200.

Layout as `one_chunk_attention`'s: q [B, Hq, D] (read in place: row m of KV head h is
request m // G, query head h * G + m % G), k / v [S, Hkv, D] (a strided slice of a pool,
read by TMA as the 2-D view [S, Hkv * D]), o [Hkv * B, G, D] and lse [Hkv * B, G] fp32
(natural log), so row h * B * G + m is KV head h's packed row m.

One program: BLOCK_M packed rows of one KV head over one split of the keys. K and V blocks
stream through a ring of STAGES shared-memory slots filled by TMA (one mbarrier per slot and
operand); QK^T of block i + 1 is issued (async wgmma) before the softmax of block i, so the
tensor cores work while the softmax runs (FA3's intra-warpgroup overlap), then P V of block
i; a slot is refilled once both of its products are done. Splits (few rows: fill the SMs)
write fp32 partial states merged by LSE in `gluon_one_chunk`. Imports only `gluon_parts` beside it (the pieces the grouped kernel shares).
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .gluon_parts import (
    LOG2E,
    WS_MAXNREG,
    _descriptor,
    _epilogue,
    _issue_kv,
    _load_q,
    _mma_layout,
    _softmax,
    _ws_loader,
    _ws_loop,
)

__all__ = ["SCHEDULES", "gluon_ok", "gluon_one_chunk", "split_plan"]

SCHEDULES = ("pipe", "ws", "wso", "wse", "wsoe", "wsk", "wsok")


@gluon.jit
def _one_chunk_kernel(
    q_ptr, k_desc, v_desc, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh, M, S, split_len, qk_scale,
    G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    # schedule "pipe": one partition; QK^T of block i + 1 in flight during softmax(i)
    pid_m = gl.program_id(0)
    kv = gl.program_id(1)
    split = gl.program_id(2)
    s_layout: gl.constexpr = _mma_layout(BLOCK_M, BLOCK_N, num_warps)
    o_layout: gl.constexpr = _mma_layout(BLOCK_M, D, num_warps)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dt: gl.constexpr = q_ptr.dtype.element_ty

    q_smem = gl.allocate_shared_memory(
        dt, [BLOCK_M, D], gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dt)
    )
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
    _load_q(q_ptr, q_smem, pid_m * BLOCK_M, kv, M, stride_qb, stride_qh, G, D, BLOCK_M, num_warps)

    lo = gl.minimum(split * split_len, S)
    hi = gl.minimum(lo + split_len, S)
    n_blocks = gl.cdiv(hi - lo, BLOCK_N)
    col = kv * D
    for i in gl.static_range(STAGES):
        _issue_kv(
            k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, i, lo, col, n_blocks, BLOCK_N, STAGES
        )

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    mbarrier.wait(k_bar.index(0), 0, pred=n_blocks > 0)
    s_tok = warpgroup_mma(
        q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True
    )
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
    for i in range(n_blocks):
        slot = i % STAGES
        nxt = i + 1
        # QK^T of the next block (a dummy on a consumed slot after the last), in flight
        # during this block's softmax
        mbarrier.wait(k_bar.index(nxt % STAGES), (nxt // STAGES) & 1, pred=nxt < n_blocks)
        s_next = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)), s_zero,
                               use_acc=False, is_async=True)  # fmt: skip
        p, alpha, m_i, l_i = _softmax(
            s, m_i, l_i, lo + i * BLOCK_N, hi, qk_scale, BLOCK_N, s_layout
        )
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p_op = gl.convert_layout(p.to(dt), p_layout)
        mbarrier.wait(v_bar.index(slot), (i // STAGES) & 1)
        acc_tok = warpgroup_mma(p_op, v_smem.index(slot), acc, is_async=True)
        acc, s = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, s_next))
        # block i's slot is free: refill it with block i + STAGES
        _issue_kv(
            k_desc,
            v_desc,
            k_smem,
            v_smem,
            k_bar,
            v_bar,
            i + STAGES,
            lo,
            col,
            n_blocks,
            BLOCK_N,
            STAGES,
        )

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))
    _epilogue(acc, m_i, l_i, pid_m * BLOCK_M, kv, split, gl.num_programs(1), M, o_ptr, lse_ptr,
              o_part_ptr, lse_part_ptr, D, BLOCK_M, SPLIT, o_layout)  # fmt: skip


@gluon.jit
def _ws_consumer(q_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, o_ptr, lse_ptr,
                 o_part_ptr, lse_part_ptr, stride_qb, stride_qh, M, lo, hi, n_blocks, kv, split,
                 hkv, row0, qk_scale, G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr,
                 WG: gl.constexpr, OVERLAP: gl.constexpr, EXP_BF16: gl.constexpr,
                 KV_APART: gl.constexpr):  # fmt: skip
    # one warpgroup of the one-chunk "ws" kernel: rows row0 .. row0 + BLOCK_M of KV head kv
    dt: gl.constexpr = q_ptr.dtype.element_ty
    _load_q(q_ptr, q_smem, row0, kv, M, stride_qb, stride_qh, G, D, BLOCK_M, 4)
    acc, m_i, l_i = _ws_loop(q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, lo, hi, n_blocks,
                             qk_scale, True, dt, D, BLOCK_M, BLOCK_N, STAGES, WG, OVERLAP, EXP_BF16,
                             KV_APART)  # fmt: skip
    _epilogue(acc, m_i, l_i, row0, kv, split, hkv, M, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
              D, BLOCK_M, SPLIT, _mma_layout(BLOCK_M, D, 4))  # fmt: skip


@gluon.jit
def _ws_consumer1(q_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, o_ptr, lse_ptr,
                  o_part_ptr, lse_part_ptr, stride_qb, stride_qh, M, lo, hi, n_blocks, kv, split,
                  hkv, row0, qk_scale, G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr,
                  OVERLAP: gl.constexpr, EXP_BF16: gl.constexpr, KV_APART: gl.constexpr):  # fmt: skip
    _ws_consumer(q_ptr, q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, o_ptr, lse_ptr,
                 o_part_ptr, lse_part_ptr, stride_qb, stride_qh, M, lo, hi, n_blocks, kv, split,
                 hkv, row0 + BLOCK_M, qk_scale, G, D, BLOCK_M, BLOCK_N, STAGES, SPLIT, 1, OVERLAP, EXP_BF16,
                 KV_APART)  # fmt: skip


@gluon.jit
def _one_chunk_ws_kernel(
    q_ptr, k_desc, v_desc, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh, M, S, split_len, qk_scale,
    G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr,
    OVERLAP: gl.constexpr = False, EXP_BF16: gl.constexpr = False, KV_APART: gl.constexpr = False,
):  # fmt: skip
    # schedule "ws": FA3's ping-pong. Two consumer warpgroups of BLOCK_M rows each (the
    # default partition and a worker) share every K/V block one loader warp brings in.
    pid_m = gl.program_id(0)
    kv = gl.program_id(1)
    split = gl.program_id(2)
    dt: gl.constexpr = q_ptr.dtype.element_ty
    q_lay: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dt)
    q_smem = gl.allocate_shared_memory(dt, [2, BLOCK_M, D], q_lay)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # slot i (its K with KV_APART), both consumers
        mbarrier.init(empty.index(STAGES + i), count=2)  # V slot i with KV_APART
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()
    lo = gl.minimum(split * split_len, S)
    hi = gl.minimum(lo + split_len, S)
    n_blocks = gl.cdiv(hi - lo, BLOCK_N)
    row0 = pid_m * 2 * BLOCK_M
    hkv = gl.num_programs(1)
    # fmt: off
    gl.warp_specialize([
        (_ws_consumer, (q_ptr, q_smem.index(0), k_smem, v_smem, k_bar, v_bar, empty, turn, o_ptr,
                        lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, M, lo, hi,
                        n_blocks, kv, split, hkv, row0, qk_scale, G, D, BLOCK_M, BLOCK_N, STAGES,
                        SPLIT, 0, OVERLAP, EXP_BF16, KV_APART)),
        (_ws_consumer1, (q_ptr, q_smem.index(1), k_smem, v_smem, k_bar, v_bar, empty, turn,
                         o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, stride_qb, stride_qh, M, lo,
                         hi, n_blocks, kv, split, hkv, row0, qk_scale, G, D, BLOCK_M, BLOCK_N,
                         STAGES, SPLIT, OVERLAP, EXP_BF16, KV_APART)),
        (_ws_loader, (k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, lo, kv * D, n_blocks,
                      BLOCK_N, STAGES, KV_APART)),
    ], [4, 1], [240, 24])
    # fmt: on


def gluon_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this kernel can run these inputs: Hopper (wgmma: sm_90 only), fp16/bf16, K/V rows
    TMA-addressable (16-byte aligned base and row stride, heads contiguous)."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9 or k.dtype != q.dtype:  # wgmma
        return False
    d = k.shape[2]
    for t in (k, v):
        if t.stride(2) != 1 or t.stride(1) != d or t.data_ptr() % 16 or (t.stride(0) * 2) % 16:
            return False
    return q.stride(2) == 1 and d in (64, 128)


def split_plan(m: int, hkv: int, s: int, block_m: int, block_n: int, target: int,
               min_split: int) -> tuple[int, int]:  # fmt: skip
    """(splits, keys per split): enough programs for `target` (rows tiles x KV heads x
    splits), splits of at least `min_split` keys, each a whole number of key blocks."""
    tiles = triton.cdiv(m, block_m) * hkv
    n = max(1, min(triton.cdiv(target, tiles), s // max(min_split, block_n)))
    split_len = triton.cdiv(triton.cdiv(s, n), block_n) * block_n
    return triton.cdiv(s, split_len), split_len


def gluon_one_chunk(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [S, Hkv, D]
    v: torch.Tensor,
    sm_scale: float,
    *,
    schedule: str = "pipe",
    block_m: int = 128,
    block_n: int = 128,
    num_warps: int = 8,
    stages: int = 2,
    programs_per_sm: int = 1,
    min_split: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [Hkv * B, G, D] q.dtype, lse [Hkv * B, G] fp32): attention of every query head of
    B requests over the chunk k / v, laid out as `one_chunk_attention`'s. `schedule`:
    "pipe" (one partition of `num_warps` warps, block_m rows a program) or "ws" (FA3's
    ping-pong: two consumer warpgroups of block_m rows each and a loader warp; num_warps
    is then 4) or "wso" ("ws" with FA3's intra-warpgroup overlap: softmax(i) beside the
    warpgroup's own P V(i - 1)); an "e" ("wse", "wsoe"): the weights' exp2 two at a time
    in bf16 (`gluon_parts._softmax`), bf16 inputs only; a "k": K and V slots freed apart
    (`gluon_parts._ws_loader`)."""
    if not gluon_ok(q, k, v):
        raise ValueError("gluon_one_chunk needs Hopper, fp16/bf16, D 64/128 and TMA-aligned K/V")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    b, hq, d = q.shape
    s, hkv, _ = k.shape
    g = hq // hkv
    m = b * g
    rows = block_m * (1 if schedule == "pipe" else 2)  # rows of one program
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    n_split, split_len = split_plan(m, hkv, s, rows, block_n, programs_per_sm * sms, min_split)
    o = torch.empty(hkv * b, g, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(hkv * b, g, device=q.device, dtype=torch.float32)
    if n_split > 1:
        o_part = torch.empty(n_split, hkv * m, d, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(n_split, hkv * m, device=q.device, dtype=torch.float32)
    else:
        o_part, lse_part = o, lse
    grid = (triton.cdiv(m, rows), hkv, n_split)
    kernel, extra = _one_chunk_kernel, {"num_warps": num_warps}
    if schedule != "pipe":  # 12 warps (9 used) in 64K registers: 240 / 240 / 24 a thread
        kernel, extra = _one_chunk_ws_kernel, {"num_warps": 4, "maxnreg": WS_MAXNREG}
        extra["OVERLAP"], extra["EXP_BF16"] = "o" in schedule[2:], "e" in schedule[2:]
        extra["KV_APART"] = "k" in schedule[2:]
        if extra["EXP_BF16"] and q.dtype != torch.bfloat16:
            raise ValueError(f"schedule {schedule!r} computes bf16 weights: pass bf16 inputs")
    kernel[grid](
        q, _descriptor(k, block_n), _descriptor(v, block_n), o, lse, o_part, lse_part,
        q.stride(0), q.stride(1), m, s, split_len, sm_scale * LOG2E,
        G=g, D=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, SPLIT=n_split > 1, **extra,
    )  # fmt: skip
    if n_split > 1:  # exact LSE merge of the splits' partial states
        mx = lse_part.max(0).values
        w = torch.exp(lse_part - mx)
        den = w.sum(0)
        o.view(hkv * m, d).copy_((o_part * w[..., None]).sum(0) / den[:, None])
        lse.view(-1).copy_(mx + torch.log(den))
    return o, lse
