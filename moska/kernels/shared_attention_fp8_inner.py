"""The key loop of the FP8 tensor-core program (`shared_attention_fp8.py`, whose docstring says
what it computes): the online softmax over one (chunk, KV head) group's keys in blocks, with
every scale applied to a score or weight row or column, never to a KV tile."""

import triton
import triton.language as tl

P_RANGE = tl.constexpr(256.0)  # the largest weight maps here before the e4m3 cut (max 448)
P_LOG2 = tl.constexpr(8.0)  # log2(P_RANGE)


@triton.jit
def _fp8_inner(
    acc, m_i, l_i, vm, q8, q8lo, q_sc, k_ptrs, v_ptrs, k_desc, v_desc, kv, col, lo, hi,
    stride_kn, stride_vn, sc_ptrs, k_scale_ptr, v_scale_ptr, stride_sc,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr, V_T: tl.constexpr,
    PER_TOKEN: tl.constexpr, Q_SPLIT: tl.constexpr, RAW_MAX: tl.constexpr,
    WARP_SPEC: tl.constexpr, TOKEN_V2: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    QSPLIT_ACC: tl.constexpr = True, SCALE_SIDES: tl.constexpr = 3,
    SC_NOMASK: tl.constexpr = False, EX2_F16: tl.constexpr = 0,
):  # fmt: skip
    # Online softmax over keys [lo, hi) in blocks of BLOCK_N; q_sc [BLOCK_M]: each row's
    # q scale times the logit scale (log2 domain). Unmasked calls need (hi - lo) % BLOCK_N
    # == 0; a TMA block past `hi` reads the next chunk: those keys get -inf and weight 0.
    # TOKEN_V2 (per-token scales): the next block's scales are loaded one block ahead (their
    # strided loads no longer stall each block), and acc is kept in units of P_RANGE / vm
    # (vm: the last block's largest V scale), the change of vm folded into alpha, so P.V
    # accumulates in place (no second accumulator tile, no extra FMA pass per block).
    offs_n = tl.arange(0, BLOCK_N)
    # SCALE_BLOCK > 0 (per-token scale pools whose values are constant over SCALE_BLOCK rows
    # from each chunk's start: library/fp8.py's "block"; BLOCK_N divides it, so every key
    # block lies in one): one K and one V scale per key block, applied as a chunk's are
    # (folded into the row scale; the weights straight from exp2 P_RANGE up, acc in units
    # of P_RANGE / the block's V scale): per-chunk speed, finer scales.
    # SCALE_SIDES (session 17, with SCALE_BLOCK): 3 both K and V scales per block; 1 K's
    # only (V per token), 2 V's only (K per token): one per-score multiply fewer than per-token
    # scales on both (K's on the score column, or V's on the weight), needs TOKEN_V2.
    K_BLK: tl.constexpr = PER_TOKEN and SCALE_BLOCK > 0 and (SCALE_SIDES & 1) != 0
    V_BLK: tl.constexpr = PER_TOKEN and SCALE_BLOCK > 0 and (SCALE_SIDES & 2) != 0
    BLK: tl.constexpr = K_BLK and V_BLK
    if K_BLK or V_BLK:
        tl.static_assert(SCALE_BLOCK % BLOCK_N == 0, "BLOCK_N must divide SCALE_BLOCK")
    blk_sc = lo.to(tl.int64) * stride_sc + kv
    ks_nx = tl.full([BLOCK_N], 1.0, tl.float32)
    vs_nx = tl.full([BLOCK_N], 0.0, tl.float32)
    if PER_TOKEN and TOKEN_V2 and not K_BLK:  # the first block's scales
        ks_nx = tl.load(k_scale_ptr + sc_ptrs, mask=(lo + offs_n) < hi, other=1.0)
    if PER_TOKEN and TOKEN_V2 and not V_BLK:
        vs_nx = tl.load(v_scale_ptr + sc_ptrs, mask=(lo + offs_n) < hi, other=0.0)
    for start in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        n_ok = (start + offs_n) < hi
        if BLK:  # the block's first row's scales (blk_sc: that row's scale offset)
            ks = tl.load(k_scale_ptr + blk_sc)
            vs = tl.load(v_scale_ptr + blk_sc)
            blk_sc += BLOCK_N * stride_sc
        elif PER_TOKEN:
            if TOKEN_V2:  # this block's scales came with the last one; the next ones now
                ks, vs = ks_nx, vs_nx
                if SC_NOMASK and not MASKED:  # full blocks: the last one reloads its own
                    # scales (dropped after the loop) instead of masking every load
                    nx = tl.minimum(start + BLOCK_N, hi - BLOCK_N)
                    nx_ptrs = sc_ptrs + (nx - start).to(tl.int64) * stride_sc
                    if not K_BLK:
                        ks_nx = tl.load(k_scale_ptr + nx_ptrs)
                    if not V_BLK:
                        vs_nx = tl.load(v_scale_ptr + nx_ptrs)
                else:
                    nxt = (start + BLOCK_N + offs_n) < hi
                    nx_ptrs = sc_ptrs + BLOCK_N * stride_sc
                    if not K_BLK:
                        ks_nx = tl.load(k_scale_ptr + nx_ptrs, mask=nxt, other=1.0)
                    if not V_BLK:
                        vs_nx = tl.load(v_scale_ptr + nx_ptrs, mask=nxt, other=0.0)
                if K_BLK:  # mixed: the block's one K (or V) scale, as BLK reads it
                    ksb = tl.load(k_scale_ptr + blk_sc)
                if V_BLK:
                    vsb = tl.load(v_scale_ptr + blk_sc)
                blk_sc += BLOCK_N * stride_sc
            else:
                ks = tl.load(k_scale_ptr + sc_ptrs, mask=n_ok, other=1.0)
                vs = tl.load(v_scale_ptr + sc_ptrs, mask=n_ok, other=0.0)
        if USE_TMA:
            k = k_desc.load([start, col])  # [BLOCK_N, D] e4m3
            if V_T:
                v = v_desc.load([col, start]).T  # [D, BLOCK_N] tile, token-major
            else:
                v = v_desc.load([start, col])
            s = _qk(q8, q8lo, k.T, Q_SPLIT, QSPLIT_ACC)
        else:
            if MASKED:
                k = tl.load(k_ptrs, mask=n_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            s = _qk(q8, q8lo, k, Q_SPLIT, QSPLIT_ACC)  # [BLOCK_M, BLOCK_N] fp32
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
        if BLK:
            if MASKED:
                s = tl.where(n_ok[None, :], s, float("-inf"))
            qk = q_sc * ks  # the row's scale times the block's K scale
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk)
            p = _pexp2(s * qk[:, None] - (m_new - P_LOG2)[:, None], EX2_F16)  # P_RANGE up
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(tl.float8e4nv), v, acc * (alpha * (vm / vs))[:, None])
            vm = vs
        elif K_BLK or V_BLK:  # mixed (TOKEN_V2): the per-token side as TOKEN_V2, the other as BLK
            if MASKED:
                s = tl.where(n_ok[None, :], s, float("-inf"))
            if K_BLK:  # the block's K scale joins the row scale; V's per token below
                qk = q_sc * ksb
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk)
                p = _pexp2(s * qk[:, None] - m_new[:, None], EX2_F16)
            else:  # K's per token on the score column; weights P_RANGE up for V's block scale
                s = s * ks[None, :]
                m_new = tl.maximum(m_i, tl.max(s, 1) * q_sc)
                p = _pexp2(s * q_sc[:, None] - (m_new - P_LOG2)[:, None], EX2_F16)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if V_BLK:  # acc in units of P_RANGE / the block's V scale (as BLK)
                acc = tl.dot(p.to(tl.float8e4nv), v, acc * (alpha * (vm / vsb))[:, None])
                vm = vsb
            else:  # acc in units of P_RANGE / v_max (as TOKEN_V2)
                v_max = tl.maximum(tl.max(vs, 0), 1e-30)
                pw = (p * (vs * (P_RANGE / v_max))[None, :]).to(tl.float8e4nv)
                acc = tl.dot(pw, v, acc * (alpha * (vm / v_max))[:, None])
                vm = v_max
            sc_ptrs += BLOCK_N * stride_sc
        else:
            if PER_TOKEN:  # the token's K scale on its score column, after the dot
                if RAW_MAX:
                    s = s * ks[None, :]
                else:
                    s = s * q_sc[:, None] * ks[None, :]
            elif not RAW_MAX:
                s = s * q_sc[:, None]
            if MASKED:
                s = tl.where(n_ok[None, :], s, float("-inf"))
            if RAW_MAX:  # q_sc > 0: the row max of s * q_sc is q_sc * (row max of s); one FMA
                m_new = tl.maximum(m_i, tl.max(s, 1) * q_sc)
                if PER_TOKEN:
                    p = _pexp2(s * q_sc[:, None] - m_new[:, None], EX2_F16)
                else:  # p_RANGE weights straight from exp2: P_RANGE = 2^P_LOG2
                    p = _pexp2(s * q_sc[:, None] - (m_new - P_LOG2)[:, None], EX2_F16)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = _pexp2(s - m_new[:, None], EX2_F16)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if PER_TOKEN:  # the token's V scale on its weight, before the e4m3 cut
                v_max = tl.maximum(tl.max(vs, 0), 1e-30)
                pw = (p * (vs * (P_RANGE / v_max))[None, :]).to(tl.float8e4nv)
                if TOKEN_V2:  # acc in units of P_RANGE / v_max from here on
                    acc = tl.dot(pw, v, acc * (alpha * (vm / v_max))[:, None])
                    vm = v_max
                else:
                    acc = acc * alpha[:, None] + tl.dot(pw, v) * (v_max / P_RANGE)
                sc_ptrs += BLOCK_N * stride_sc
            elif RAW_MAX:  # p and l_i are both in units of 1 / P_RANGE: o = acc / l_i as is
                acc = tl.dot(p.to(tl.float8e4nv), v, acc * alpha[:, None])
            else:  # 1 / P_RANGE goes with the chunk's V scale onto the output
                acc = tl.dot((p * P_RANGE).to(tl.float8e4nv), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i, vm


@triton.jit
def _qk(q8, q8lo, kt, Q_SPLIT: tl.constexpr, QSPLIT_ACC: tl.constexpr):
    # QK^T on FP8 tensor cores, in units of q's row scale; Q_SPLIT: q = q8 + q8lo (QSPLIT_ACC:
    # q8lo the e4m3 rounding residual as is, the second dot accumulating onto the first) or
    # q8 + q8lo / 16 (the residual 16x up); two dots for 2^-8 relative q error
    if Q_SPLIT and QSPLIT_ACC:
        s = tl.dot(q8, kt, tl.dot(q8lo, kt))
    else:
        s = tl.dot(q8, kt)
        if Q_SPLIT:
            s = tl.dot(q8lo, kt, s * 16.0) * 0.0625
    return s


@triton.jit
def _pexp2(x, EX2_F16: tl.constexpr):
    # The weights' exp2. EX2_F16 (session 18): exp2 in f16, two per instruction
    # (`ex2.approx.f16x2`: half the special-function-unit issues of fp32 `ex2`, the unit
    # every score passes through; the weights are cut to e4m3 next, 3 mantissa bits, f16
    # keeps 10). 1: the PTX instruction (GPU), 2: tl.math.exp2 on f16 (the interpreter:
    # the same rounding of the argument, not the same exp). The row sum of f16 weights
    # (<= P_RANGE each) is taken in f16 per key block, then added to the fp32 running sum.
    if EX2_F16 == 1:
        p = tl.inline_asm_elementwise(
            "ex2.approx.f16x2 $0, $1;",
            "=r,r",
            [x.to(tl.float16)],
            dtype=tl.float16,
            is_pure=True,
            pack=2,
        )
    elif EX2_F16 == 2:
        p = tl.math.exp2(x.to(tl.float16).to(tl.float32)).to(tl.float16)
    else:
        p = tl.math.exp2(x)
    return p
