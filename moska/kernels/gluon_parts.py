"""Shared Gluon pieces of the Hopper attention kernels (`gluon_one_chunk.py`,
`gluon_grouped.py`; issue 22): MMA / load layouts, the q tile load, the online softmax step,
the (o, lse) epilogue, FA3's ping-pong key loop of one consumer warpgroup (`_ws_loop`) and
its loader warp (`_ws_loader`), and the TMA descriptor of a [S, Hkv, D] pool. Imports nothing
from moska.
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

WS_MAXNREG = 168  # 12 warps x 32 threads x 168 <= 64K registers

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
def _load_q(q_ptr, q_smem, row0, kv, M, stride_qb, stride_qh, G: gl.constexpr,
            D: gl.constexpr, BLOCK_M: gl.constexpr, NW: gl.constexpr):  # fmt: skip
    # packed rows row0.. of KV head kv -> shared memory (the A operand of QK^T), read in
    # place from q [B, Hq, D]: row m is request m // G, query head kv * G + m % G
    q_layout: gl.constexpr = _q_layout(D, NW)
    offs_m = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
    q_off = (offs_m // G).to(gl.int64) * stride_qb + (kv * G + offs_m % G) * stride_qh
    q = gl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=(offs_m < M)[:, None], other=0.0)
    q_smem.store(q)
    fence_async_shared()


@gluon.jit
def _softmax(s, m_i, l_i, start, hi, qk_scale, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
             EXP_BF16: gl.constexpr = False):  # fmt: skip
    # online softmax of one score block (log2 domain); a split's last block may be partial.
    # EXP_BF16: the weights' exp2 as `ex2.approx.ftz.bf16x2` (two per special-function-unit
    # issue, the result already the bf16 P operand; the argument rounded to bf16 first), the
    # row sum from those bf16 weights
    if start + BLOCK_N > hi:
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where((start + offs_n < hi)[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    if EXP_BF16:
        x = (s * qk_scale - m_new[:, None]).to(gl.bfloat16)
        p = gl.inline_asm_elementwise("ex2.approx.ftz.bf16x2 $0, $1;", "=r,r", [x],
                                      dtype=gl.bfloat16, is_pure=True, pack=2)  # fmt: skip
        l_add = gl.sum(p.to(gl.float32), axis=1)
    else:
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_add = gl.sum(p, axis=1)
    alpha = gl.exp2(m_i - m_new)
    l_new = l_i * alpha + l_add
    return p, alpha, m_new, l_new


@gluon.jit
def _epilogue(acc, m_i, l_i, row0, kv, split, hkv, M, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
              D: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT: gl.constexpr,
              o_layout: gl.constexpr):  # fmt: skip
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_o = gl.convert_layout(l_i, row_o)
    out = acc / gl.maximum(l_o, 1e-30)[:, None]
    lse = gl.convert_layout((m_i + gl.log2(l_i)) * _LN2, row_o)  # -inf for an empty split
    rows = row0 + gl.arange(0, BLOCK_M, layout=row_o)
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    flat = (kv * M + rows).to(gl.int64)
    row_ok = rows < M
    if SPLIT:
        part = split.to(gl.int64) * hkv * M + flat
        gl.store(o_part_ptr + part[:, None] * D + cols[None, :], out, mask=row_ok[:, None])
        gl.store(lse_part_ptr + part, lse, mask=row_ok)
    else:
        gl.store(o_ptr + flat[:, None] * D + cols[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])  # fmt: skip
        gl.store(lse_ptr + flat, lse, mask=row_ok)


@gluon.jit
def _ws_loader(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty, lo, col, n_blocks,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, KV_APART: gl.constexpr = False,
               c0=0):  # fmt: skip
    # one warp: TMA of every key block into the ring once both consumers freed its slot:
    # `empty` [STAGES] (K and V of a slot together: session 18's call 1, the faster), or
    # with KV_APART [2 * STAGES], K slot s (index s) and V slot s (STAGES + s) freed apart.
    # c0: blocks this program streamed before (a persistent program's earlier items): block
    # i uses slot (c0 + i) % STAGES, the consumers count the same way
    for i in range(n_blocks):
        c = c0 + i
        slot = c % STAGES
        free = ((c // STAGES) & 1) ^ 1  # a fresh barrier passes
        row = lo + i * BLOCK_N
        mbarrier.wait(empty.index(slot), free)
        mbarrier.expect(k_bar.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, col], k_bar.index(slot), k_smem.index(slot))
        if KV_APART:
            mbarrier.wait(empty.index(STAGES + slot), free)
        mbarrier.expect(v_bar.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row, col], v_bar.index(slot), v_smem.index(slot))


@gluon.jit
def _ws_idle(k_bar, v_bar, empty, n_blocks, STAGES: gl.constexpr, KV_APART: gl.constexpr,
             c0=0):  # fmt: skip
    # a consumer warpgroup with no rows: frees every slot the other one reads, computes nothing
    for i in range(n_blocks):
        c = c0 + i
        slot = c % STAGES
        mbarrier.wait(k_bar.index(slot), (c // STAGES) & 1)
        if KV_APART:
            mbarrier.arrive(empty.index(slot), count=1)
        mbarrier.wait(v_bar.index(slot), (c // STAGES) & 1)
        mbarrier.arrive(empty.index(STAGES * KV_APART + slot), count=1)


@gluon.jit
def _turn_parity(j, WG: gl.constexpr):
    # the mbarrier parity warpgroup WG waits on for its j-th turn: the first of the rotation
    # passes its first turn on the fresh barrier, the others wait for their predecessor
    if WG == 0:
        par = (j & 1) ^ 1
    else:
        par = j & 1
    return par


@gluon.jit
def _ws_loop(q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, lo, hi, n_blocks, qk_scale, pp,
             dt: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
             STAGES: gl.constexpr, WG: gl.constexpr, OVERLAP: gl.constexpr = False,
             EXP_BF16: gl.constexpr = False, KV_APART: gl.constexpr = False,
             MAY_BE_EMPTY: gl.constexpr = False, c0=0, t0=0, na=2):  # fmt: skip
    # One consumer warpgroup's key loop over BLOCK_M (64) rows in q_smem: (acc, m_i, l_i).
    # Ping-pong (`pp`, both consumers busy): they take turns to issue their products
    # (mbarriers `turn`), so one's softmax runs beside the other's GEMMs. A slot is freed
    # (`empty`, see `_ws_loader`) once its P V is done (KV_APART: K after its QK^T).
    # OVERLAP (FA3's intra-warpgroup overlap on top): softmax(i) runs as soon as QK^T(i) is
    # done, while this warpgroup's own P V(i - 1) is still in flight; the accumulator is
    # rescaled after it lands. MAY_BE_EMPTY: n_blocks may be 0 (an absent chunk). c0 / t0:
    # blocks streamed and turns taken before (a persistent program's earlier items). na: the
    # warpgroups in the rotation (0 .. na - 1; WG hands its turn to WG + 1 mod na).
    s_layout: gl.constexpr = _mma_layout(BLOCK_M, BLOCK_N, 4)
    o_layout: gl.constexpr = _mma_layout(BLOCK_M, D, 4)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    if MAY_BE_EMPTY:
        if n_blocks > 0:
            acc, m_i, l_i = _ws_blocks(q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, lo, hi,
                                       n_blocks, qk_scale, pp, acc, m_i, l_i, c0, t0, na, dt, BLOCK_M,
                                       BLOCK_N, STAGES, WG, OVERLAP, EXP_BF16, KV_APART,
                                       s_layout, o_layout, p_layout)  # fmt: skip
    else:
        acc, m_i, l_i = _ws_blocks(q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, lo, hi,
                                   n_blocks, qk_scale, pp, acc, m_i, l_i, c0, t0, na, dt, BLOCK_M,
                                   BLOCK_N, STAGES, WG, OVERLAP, EXP_BF16, KV_APART, s_layout,
                                   o_layout, p_layout)  # fmt: skip
    return acc, m_i, l_i


@gluon.jit
def _ws_blocks(q_smem, k_smem, v_smem, k_bar, v_bar, empty, turn, lo, hi, n_blocks, qk_scale, pp,
               acc, m_i, l_i, c0, t0, na, dt: gl.constexpr, BLOCK_M: gl.constexpr,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr,
               OVERLAP: gl.constexpr, EXP_BF16: gl.constexpr, KV_APART: gl.constexpr,
               s_layout: gl.constexpr, o_layout: gl.constexpr,
               p_layout: gl.constexpr):  # fmt: skip
    # the blocks of `_ws_loop` (n_blocks >= 1); block i is the program's block c0 + i, and
    # its turn (if pp) the program's turn t0 + i (t0 + n_blocks for the last P V)
    V0: gl.constexpr = STAGES * KV_APART  # V slot s is freed at empty[V0 + s]
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    # block 0: QK^T, softmax
    slot = c0 % STAGES
    nxt = (WG + 1) % na
    mbarrier.wait(turn.index(WG), _turn_parity(t0, WG), pred=pp)
    mbarrier.wait(k_bar.index(slot), (c0 // STAGES) & 1)
    s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)  # fmt: skip
    mbarrier.arrive(turn.index(nxt), count=1, pred=pp)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
    if KV_APART:
        mbarrier.arrive(empty.index(slot), count=1)  # K block 0 is read
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, lo, hi, qk_scale, BLOCK_N, s_layout, EXP_BF16)
    for i in range(1, n_blocks):
        # issue QK^T(i) and P V(i - 1) in our turn, then softmax(i) while the other
        # consumer's products run
        c = c0 + i
        slot = c % STAGES
        prev = (c - 1) % STAGES
        mbarrier.wait(turn.index(WG), _turn_parity(t0 + i, WG), pred=pp)
        mbarrier.wait(k_bar.index(slot), (c // STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)  # fmt: skip
        mbarrier.wait(v_bar.index(prev), ((c - 1) // STAGES) & 1)
        p_op = gl.convert_layout(p.to(dt), p_layout)
        acc_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        mbarrier.arrive(turn.index(nxt), count=1, pred=pp)
        if OVERLAP:
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
            if KV_APART:
                mbarrier.arrive(empty.index(slot), count=1)  # K block i is read
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, lo + i * BLOCK_N, hi, qk_scale, BLOCK_N,
                                          s_layout, EXP_BF16)  # fmt: skip
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, p_op))
            mbarrier.arrive(empty.index(V0 + prev), count=1)  # block i - 1 is read
        else:
            s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, acc_tok))
            if KV_APART:
                mbarrier.arrive(empty.index(slot), count=1)  # K block i is read
            mbarrier.arrive(empty.index(V0 + prev), count=1)  # block i - 1 is read
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, lo + i * BLOCK_N, hi, qk_scale, BLOCK_N,
                                          s_layout, EXP_BF16)  # fmt: skip
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    c = c0 + n_blocks - 1
    last = c % STAGES
    mbarrier.wait(turn.index(WG), _turn_parity(t0 + n_blocks, WG), pred=pp)
    mbarrier.wait(v_bar.index(last), (c // STAGES) & 1)
    acc_tok = warpgroup_mma(gl.convert_layout(p.to(dt), p_layout), v_smem.index(last), acc,
                            is_async=True)  # fmt: skip
    mbarrier.arrive(turn.index(nxt), count=1, pred=pp)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
    mbarrier.arrive(empty.index(V0 + last), count=1)
    return acc, m_i, l_i


def _descriptor(t: torch.Tensor, block_n: int) -> TensorDescriptor:
    s, hkv, d = t.shape
    layout = gl.NVMMASharedLayout.get_default_for(
        [block_n, d], gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    )
    return TensorDescriptor(t, [s, hkv * d], [t.stride(0), 1], [block_n, d], layout)
