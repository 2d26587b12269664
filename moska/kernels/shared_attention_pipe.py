"""The grouped kernel's key loop with QK^T issued one block ahead (`pipe_qk`, issue 22).

FlashAttention-3's intra-warpgroup overlap, written in the source: the scores of key block
j + 1 are asked for (an asynchronous warpgroup MMA on Hopper) before the online softmax and
the PV product of block j, so the softmax's exponentials can run while the tensor cores
compute the next QK^T; Triton waits for an MMA only where its result is first used. It
holds two score tiles in registers, so it suits tiles whose BLOCK_M x BLOCK_N scores fit
twice (D = 64 at 128 x 128, D = 128 at 128 x 64 or 64 x 64). Same arithmetic as
`_chunk_attn_inner` (bf16/fp16/fp32 K/V, no FP8 scales), so the same reference holds. The
online-softmax step both loops share, `_softmax_pv`, lives here too.
"""

import triton
import triton.language as tl


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
def _chunk_attn_inner_pipe(
    acc,
    m_i,
    l_i,
    q,
    k_ptrs,
    v_ptrs,
    k_desc,
    v_desc,
    col,
    lo,
    hi,
    qk_scale,
    stride_kn,
    stride_vn,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Keys [lo, hi) with (hi - lo) % BLOCK_N == 0 (the unmasked part of a split); k_ptrs /
    # v_ptrs point at block `lo` (pointer path). s holds block j's scores while block j + 1's
    # are computed; v lags K by one block.
    if hi > lo:
        if USE_TMA:
            s = tl.dot(q, k_desc.load([lo, col]).T, input_precision=PRECISION)
        else:
            s = tl.dot(q, tl.load(k_ptrs), input_precision=PRECISION)
            k_ptrs += BLOCK_N * stride_kn
        for start in tl.range(lo + BLOCK_N, hi, BLOCK_N):
            if USE_TMA:
                s_next = tl.dot(q, k_desc.load([start, col]).T, input_precision=PRECISION)
                v = v_desc.load([start - BLOCK_N, col])
            else:
                s_next = tl.dot(q, tl.load(k_ptrs), input_precision=PRECISION)
                v = tl.load(v_ptrs)
                k_ptrs += BLOCK_N * stride_kn
                v_ptrs += BLOCK_N * stride_vn
            acc, m_i, l_i = _softmax_pv(acc, m_i, l_i, s, v, qk_scale, PRECISION)
            s = s_next
        if USE_TMA:
            v = v_desc.load([hi - BLOCK_N, col])
        else:
            v = tl.load(v_ptrs)
        acc, m_i, l_i = _softmax_pv(acc, m_i, l_i, s, v, qk_scale, PRECISION)
    return acc, m_i, l_i
