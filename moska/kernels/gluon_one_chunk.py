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
write fp32 partial states merged by LSE in `gluon_one_chunk`. Imports nothing from moska.
"""

import torch
import triton
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

__all__ = ["gluon_ok", "gluon_one_chunk", "split_plan"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LN2 = gl.constexpr(LN2)


@gluon.constexpr_function
def _mma_layout(block_m, n, num_warps):
    # the warps tile M (16 rows a warp, a warpgroup = 64 rows); one instruction spans n
    return gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16]
    )


@gluon.constexpr_function
def _q_layout(d, num_warps):
    tpw_d = min(d // 8, 32)
    return gl.BlockedLayout([1, 8], [32 // tpw_d, tpw_d], [num_warps, 1], [1, 0])


@gluon.jit
def _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, blk, lo, col, n_blocks,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    # TMA of key block `blk` (absolute rows lo + blk * BLOCK_N) into its ring slot
    slot = blk % STAGES
    ok = blk < n_blocks
    row = lo + blk * BLOCK_N
    mbarrier.expect(k_bar.index(slot), k_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(
        k_desc, [row, col], k_bar.index(slot), k_smem.index(slot), pred=ok
    )
    mbarrier.expect(v_bar.index(slot), v_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(
        v_desc, [row, col], v_bar.index(slot), v_smem.index(slot), pred=ok
    )


@gluon.jit
def _one_chunk_kernel(
    q_ptr, k_desc, v_desc, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh, M, S, split_len, qk_scale,
    G: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    pid_m = gl.program_id(0)
    kv = gl.program_id(1)
    split = gl.program_id(2)
    hkv = gl.num_programs(1)

    s_layout: gl.constexpr = _mma_layout(BLOCK_M, BLOCK_N, num_warps)
    o_layout: gl.constexpr = _mma_layout(BLOCK_M, D, num_warps)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_layout: gl.constexpr = _q_layout(D, num_warps)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)

    # q tile -> shared memory (the A operand of QK^T), read in place from [B, Hq, D]
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
    req = offs_m // G
    head = kv * G + offs_m % G
    q_off = req.to(gl.int64) * stride_qb + head * stride_qh
    q = gl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=(offs_m < M)[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(q_ptr.dtype.element_ty, [BLOCK_M, D],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], q_ptr.dtype.element_ty))  # fmt: skip
    q_smem.store(q)

    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
    fence_async_shared()

    lo = gl.minimum(split * split_len, S)
    hi = gl.minimum(lo + split_len, S)
    n_blocks = gl.cdiv(hi - lo, BLOCK_N)
    col = kv * D
    for i in gl.static_range(STAGES):
        _issue_kv(
            k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, i, lo, col, n_blocks, BLOCK_N, STAGES
        )

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    offs_n = gl.arange(0, BLOCK_N, layout=col_s)

    # QK^T of block 0
    mbarrier.wait(k_bar.index(0), 0, pred=n_blocks > 0)
    s_tok = warpgroup_mma(
        q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True
    )
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
    for i in range(n_blocks):
        slot = i % STAGES
        phase = (i // STAGES) & 1
        nxt = i + 1
        # QK^T of the next block, in flight during this block's softmax
        has_next = nxt < n_blocks
        mbarrier.wait(k_bar.index(nxt % STAGES), (nxt // STAGES) & 1, pred=has_next)
        s_next = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)), s_zero,
                               use_acc=False, is_async=True)  # fmt: skip
        # online softmax of block i (log2 domain); the split's last block may be partial
        start = lo + i * BLOCK_N
        if start + BLOCK_N > hi:
            s = gl.where((start + offs_n < hi)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_op = gl.convert_layout(p.to(q_ptr.dtype.element_ty), p_layout)
        mbarrier.wait(v_bar.index(slot), phase)
        acc_tok = warpgroup_mma(p_op, v_smem.index(slot), acc, is_async=True)
        acc, s = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, s_next))
        # slot of block i is free: refill it with block i + STAGES
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

    l_o = gl.convert_layout(l_i, row_o)
    out = acc / gl.maximum(l_o, 1e-30)[:, None]
    lse = (m_i + gl.log2(l_i)) * _LN2  # -inf for an empty split
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_o)
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    flat = (kv * M + rows).to(gl.int64)
    row_ok = rows < M
    lse = gl.convert_layout(lse, row_o)
    if SPLIT:
        part = split.to(gl.int64) * hkv * M + flat
        gl.store(o_part_ptr + part[:, None] * D + cols[None, :], out, mask=row_ok[:, None])
        gl.store(lse_part_ptr + part, lse, mask=row_ok)
    else:
        gl.store(o_ptr + flat[:, None] * D + cols[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])  # fmt: skip
        gl.store(lse_ptr + flat, lse, mask=row_ok)


def gluon_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this kernel can run these inputs: Hopper or newer CUDA, fp16/bf16, K/V rows
    TMA-addressable (16-byte aligned base and row stride, heads contiguous)."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(q.device)[0] < 9 or k.dtype != q.dtype:
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


def _descriptor(t: torch.Tensor, block_n: int) -> TensorDescriptor:
    s, hkv, d = t.shape
    layout = gl.NVMMASharedLayout.get_default_for(
        [block_n, d], gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    )
    return TensorDescriptor(t, [s, hkv * d], [t.stride(0), 1], [block_n, d], layout)


def gluon_one_chunk(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [S, Hkv, D]
    v: torch.Tensor,
    sm_scale: float,
    *,
    block_m: int = 128,
    block_n: int = 128,
    num_warps: int = 8,
    stages: int = 2,
    programs_per_sm: int = 1,
    min_split: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [Hkv * B, G, D] q.dtype, lse [Hkv * B, G] fp32): attention of every query head of
    B requests over the chunk k / v, laid out as `one_chunk_attention`'s."""
    if not gluon_ok(q, k, v):
        raise ValueError("gluon_one_chunk needs Hopper, fp16/bf16, D 64/128 and TMA-aligned K/V")
    b, hq, d = q.shape
    s, hkv, _ = k.shape
    g = hq // hkv
    m = b * g
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    n_split, split_len = split_plan(m, hkv, s, block_m, block_n, programs_per_sm * sms, min_split)
    o = torch.empty(hkv * b, g, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(hkv * b, g, device=q.device, dtype=torch.float32)
    if n_split > 1:
        o_part = torch.empty(n_split, hkv * m, d, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(n_split, hkv * m, device=q.device, dtype=torch.float32)
    else:
        o_part, lse_part = o, lse
    grid = (triton.cdiv(m, block_m), hkv, n_split)
    _one_chunk_kernel[grid](
        q, _descriptor(k, block_n), _descriptor(v, block_n), o, lse, o_part, lse_part,
        q.stride(0), q.stride(1), m, s, split_len, sm_scale * LOG2E,
        G=g, D=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, SPLIT=n_split > 1,
        num_warps=num_warps,
    )  # fmt: skip
    if n_split > 1:  # exact LSE merge of the splits' partial states
        mx = lse_part.max(0).values
        w = torch.exp(lse_part - mx)
        den = w.sum(0)
        o.view(hkv * m, d).copy_((o_part * w[..., None]).sum(0) / den[:, None])
        lse.view(-1).copy_(mx + torch.log(den))
    return o, lse
