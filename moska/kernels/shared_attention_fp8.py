"""The FP8 tensor-core program of grouped shared-chunk attention (FA3-style, `fp8_mma`).

Why a second program: the e4m3 paths of `shared_attention_kernel.py` upcast each K/V tile
to bf16 in registers before `tl.dot` (or, with `fp8_dot`, V only). On Hopper a dot's
B operand must sit in shared memory, so an upcast tile is written back there and the
asynchronous TMA -> wgmma pipeline stalls on it; with per-token scales the scale multiply
also sits between the load and the dot. On the H200 that made e4m3 KV 0.35-0.55x the
speed of bf16 (bench/results/fp8_attention_h200_*_scales.json). Here no KV tile is touched
element-wise: both products run on FP8 tensor cores straight from the loaded tiles, and
every scale is applied to a score or weight row or column instead:

    QK^T: q is cut to e4m3 per query row (q = q8 * q_s[row]); s = dot(q8, k8^T) in fp32,
          then s * (q_s[row] * sm_scale) * k_scale[token]   (k = k8 * k_scale[token])
    P.V:  the softmax weights p (in [0, 1]) times v_scale[token] are cut to e4m3 after
          mapping the block's largest v_scale to P_RANGE (e4m3 keeps 2^-4 relative error
          from 2^-6 up, so small weights keep their precision), and the block's dot
          is scaled back by v_max / P_RANGE: o += dot(e4m3(p * vs * R / v_max), v8) * v_max / R

Per-(chunk, KV head) scales fold into the logit scale (K) and the output (V), as in the
upcast program. `V_T`: V read from a token-major copy [Hkv * D, S_total] (the operand layout
FP8 wgmma wants for P.V; with the library's [S_total, Hkv, D] layout the compiler may have to
transpose V's tile in shared memory). Launched by `shared_attention.py` (`fp8_mma=True`).
"""

import os
from typing import Self

import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .merge import merge_finish
from .shared_attention_fp8_inner import P_LOG2, P_RANGE, _fp8_inner

# RAW_MAX (per-chunk scales): the running max is taken on the unscaled scores, the row's
# scale applied inside exp2's argument (one FMA) and the weights come out of exp2 already
# P_RANGE up: fewer fp32 multiplies per score. With per-token scales the same trick ran
# 2-6 % slower on the H200 (bench/results/fp8_attention_h200_session16.json, `_scaled`
# rows), so per-token launches keep scaling each score first.
# TOKEN_V2 (per-token scales; `_fp8_inner` says what it does): per-token scales cost 55 % at
# B = 1,024 on the H200 (1.66 vs 1.07 ms with per-chunk scales, same run), far more than
# their two multiplies per score: the strided scale loads stalled every block and P.V
# needed a second accumulator. Exact algebra (same e4m3 cuts); off: the former code.
# Module flags read at launch by `fp8_mma_args` (bench/fp8_attention.py flips them for A/Bs).
RAW_MAX = True
TOKEN_V2 = True
# QSPLIT_ACC (q in two e4m3 terms): the residual is cut as is, not 16x up, so the second QK^T
# dot accumulates onto the first (s = dot(q8lo, k, dot(q8, k))) with no per-score rescale:
# the former form spent two fp32 multiplies per score (s * 16 into the dot, * 1/16 after)
# on top of the per-token scales' two. The residual of an element below 2^-2 (1/1760 of its
# row's largest) falls in e4m3's subnormals: absolute error 2^-10 in units where the row's
# largest is 440, beside the 2^-8 relative error of the split. Off: the former code (A/B).
QSPLIT_ACC = True
# RAW_MAX with per-token scales too: 2-6 % slower in session 16 (one-term q, the former
# prefetch), 5 % faster with q split in session 17 (1.569 vs 1.657 ms at B = 1,024, H200,
# bench/results/fp8_attention_h200_session17.json)
RAW_MAX_TOKEN = True
# with `fp8_scale_block`: which scales are per block (3 K and V, 1 K only, 2 V only; the other
# per token): library/fp8.py quantizes K and V each at its own granularity
SCALE_SIDES = 3
# SC_NOMASK (per-token scales, TOKEN_V2): over whole key blocks the next block's scales are
# loaded unmasked (the last block reloads its own). Measured slower: 1.657 vs 1.546 ms masked
# (q split, B = 1,024, H200, fp8_attention_h200_session17.json), so off; kept for A/Bs
SC_NOMASK = False
# EX2_F16 (session 18): the weights' exp2 in f16, two per `ex2.approx.f16x2` (the score's
# special-function-unit issue halved; `_pexp2`). Off until measured (fp8_reach A/B)
EX2_F16 = False


def fp8_mma_args(
    fp8: dict, fp8_dot: bool, k_pool, v_pool_t, q_split: bool, scale_block: int = 0
) -> dict:
    """The program's extra constexpr (V_T) after checking its inputs: e4m3 pools (`fp8`
    the launcher's e4m3 arguments, empty for other pools), not with `fp8_dot`; `v_pool_t`
    None or a contiguous e4m3 [Hkv, D, S_total] copy of V (S_total padded up to a multiple
    of 16, the padding zero: a block past a chunk's end gets weight 0), read through TMA
    only (every chunk must start at a multiple of 16 rows: TMA offsets are 16-byte aligned)."""
    if not fp8:
        raise ValueError(f"fp8_mma is for float8_e4m3fn pools, not {k_pool.dtype}")
    if fp8_dot:
        raise ValueError("fp8_mma and fp8_dot are two programs: pass one")
    if scale_block and (not fp8.get("PER_TOKEN") or scale_block < 0 or scale_block % 16):
        raise ValueError(
            f"fp8_scale_block={scale_block}: for per-token scale pools [S_total, Hkv] whose "
            "values are constant over that many rows from each chunk's start (a multiple of 16)"
        )
    if v_pool_t is None:
        return {"Q_SPLIT": q_split, **_flags(fp8, scale_block)}
    s, hkv, d = k_pool.shape
    s_t = -(-s // 16) * 16  # TMA strides are 16-byte multiples: S_total padded up to 16
    if (
        v_pool_t.dtype != k_pool.dtype
        or tuple(v_pool_t.shape) not in ((hkv, d, s), (hkv, d, s_t))
        or not v_pool_t.is_contiguous()
        or v_pool_t.device != k_pool.device
    ):
        raise ValueError(
            f"v_pool_t must be a contiguous {k_pool.dtype} [Hkv, D, S_total padded to a "
            f"multiple of 16] = {(hkv, d, s_t)} on {k_pool.device}; got {v_pool_t.dtype} "
            f"{tuple(v_pool_t.shape)}"
        )
    if v_pool_t.shape[2] % 16:
        raise ValueError(f"v_pool_t is read through TMA: pad S_total ({s}) to a multiple of 16")
    return {"V_T": True, "Q_SPLIT": q_split, **_flags(fp8, scale_block)}


class SidedBlock(int):
    """`fp8_scale_block` for pools where one side's scales are per block of int(self) rows
    and the other's per token: `sides` 1 (K per block) or 2 (V per block: measured to keep
    top-1 >= 0.99 with q split, bench/results/fp8_quality_mixed.json). A plain int: both."""

    sides: int

    def __new__(cls, rows: int, sides: int) -> Self:
        if sides not in (1, 2):
            raise ValueError(f"sides={sides}: 1 (K per block) or 2 (V per block)")
        out = super().__new__(cls, rows)
        out.sides = sides
        return out


def _flags(fp8: dict, scale_block: int) -> dict:
    per_token = bool(fp8.get("PER_TOKEN"))
    raw = RAW_MAX and (RAW_MAX_TOKEN or not per_token)
    flags: dict[str, bool | int] = {"RAW_MAX": raw, "TOKEN_V2": TOKEN_V2 and per_token}
    if scale_block and SCALE_SIDES not in (1, 2, 3):
        raise ValueError(f"SCALE_SIDES={SCALE_SIDES}: 1 (K), 2 (V) or 3 (both)")
    if scale_block and getattr(scale_block, "sides", SCALE_SIDES) != 3 and not flags["TOKEN_V2"]:
        raise ValueError("K-only or V-only block scales need TOKEN_V2")
    sides = getattr(scale_block, "sides", SCALE_SIDES) if scale_block else 3
    flags.update(QSPLIT_ACC=QSPLIT_ACC, SCALE_SIDES=sides, SC_NOMASK=SC_NOMASK)
    if EX2_F16:  # the PTX instruction on the GPU, tl.math.exp2 on f16 in the interpreter
        flags["EX2_F16"] = 2 if os.environ.get("TRITON_INTERPRET") == "1" else 1
    return {**flags, "SCALE_BLOCK": int(scale_block)}  # (a plain int constexpr)


def v_t_descriptor(v_pool_t, block_n: int) -> TensorDescriptor:
    """TMA descriptor of a token-major V copy [Hkv, D, S] as [Hkv * D, S], [D, block_n] tiles."""
    hkv, d, s = v_pool_t.shape
    return TensorDescriptor(v_pool_t, [hkv * d, s], [s, 1], [d, block_n])


# fmt: off
@triton.jit
def _grouped_fp8_mma_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr,
    sel_chunk_ptr, work_ptr, meta_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, W, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, PRECISION: tl.constexpr,
    PERSISTENT: tl.constexpr,
    k_scale_ptr=None, v_scale_ptr=None, stride_sc=0,
    KV_FP8: tl.constexpr = True, FP8_DOT: tl.constexpr = False, CDTYPE: tl.constexpr = None,
    PER_TOKEN: tl.constexpr = False, chunk_scale_ptr=None, CHUNK_SCALE: tl.constexpr = False,
    V_T: tl.constexpr = False, Q_SPLIT: tl.constexpr = False, RAW_MAX: tl.constexpr = False,
    TOKEN_V2: tl.constexpr = False, SCALE_BLOCK: tl.constexpr = 0,
    QSPLIT_ACC: tl.constexpr = False, SCALE_SIDES: tl.constexpr = 3,
    SC_NOMASK: tl.constexpr = False, EX2_F16: tl.constexpr = 0,
    HALF_TAIL: tl.constexpr = False,
):
    # fmt: on
    # The arguments of `_grouped_shared_attention_kernel` (PRECISION, KV_FP8, FP8_DOT and
    # CDTYPE are unused: this program is e4m3 only; WARP_SPEC: the key loop warp-specialized);
    # V_T: v_desc is the descriptor of a token-major V copy [Hkv * D, S_total].
    n_items = tl.load(meta_ptr)
    if PERSISTENT:
        for w in range(tl.program_id(0), n_items, tl.num_programs(0)):
            # fmt: off
            _fp8_item(
                w, q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr,
                sel_kv_ptr, sel_chunk_ptr, work_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
                stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, W, qk_scale,
                G, D, BLOCK_M, BLOCK_N, USE_TMA, V_T, k_scale_ptr, v_scale_ptr, stride_sc,
                PER_TOKEN, chunk_scale_ptr, CHUNK_SCALE, Q_SPLIT, RAW_MAX, WARP_SPEC,
                TOKEN_V2, SCALE_BLOCK, QSPLIT_ACC, SCALE_SIDES, SC_NOMASK, EX2_F16, BLOCK_M,
            )
            # fmt: on
    else:
        w = tl.program_id(0)
        if w < n_items:
            # HALF_TAIL: a group's last tile of <= BLOCK_M / 2 rows computes BLOCK_M / 2 rows
            # (the bf16 program's half tail: 128-row tiles at 64-row granularity). The
            # persistent grid above computes whole tiles (it was slower for FP8 in session 26)
            tail = BLOCK_M
            if HALF_TAIL:
                tail = tl.load(work_ptr + W + w) * G - tl.load(work_ptr + 2 * W + w) * BLOCK_M
            if tail <= BLOCK_M // 2:
                # fmt: off
                _fp8_item(
                    w, q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr,
                    sel_kv_ptr, sel_chunk_ptr, work_ptr, o_ptr, lse_ptr, o_part_ptr,
                    lse_part_ptr, stride_qb, stride_qh, stride_kn, stride_kh, stride_vn,
                    stride_vh, W, qk_scale, G, D, BLOCK_M // 2, BLOCK_N, USE_TMA, V_T,
                    k_scale_ptr, v_scale_ptr, stride_sc, PER_TOKEN, chunk_scale_ptr, CHUNK_SCALE,
                    Q_SPLIT, RAW_MAX, WARP_SPEC, TOKEN_V2, SCALE_BLOCK, QSPLIT_ACC, SCALE_SIDES,
                    SC_NOMASK, EX2_F16, BLOCK_M,
                )
                # fmt: on
            else:
                # fmt: off
                _fp8_item(
                    w, q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr,
                    sel_kv_ptr, sel_chunk_ptr, work_ptr, o_ptr, lse_ptr, o_part_ptr,
                    lse_part_ptr, stride_qb, stride_qh, stride_kn, stride_kh, stride_vn,
                    stride_vh, W, qk_scale, G, D, BLOCK_M, BLOCK_N, USE_TMA, V_T,
                    k_scale_ptr, v_scale_ptr, stride_sc, PER_TOKEN, chunk_scale_ptr, CHUNK_SCALE,
                    Q_SPLIT, RAW_MAX, WARP_SPEC, TOKEN_V2, SCALE_BLOCK, QSPLIT_ACC, SCALE_SIDES,
                    SC_NOMASK, EX2_F16, BLOCK_M,
                )
                # fmt: on


# fmt: off
@triton.jit
def _fp8_item(
    w, q_ptr, k_ptr, v_ptr, k_desc, v_desc, starts_ptr, ends_ptr, sel_req_ptr, sel_kv_ptr,
    sel_chunk_ptr, work_ptr, o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, W, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, V_T: tl.constexpr, k_scale_ptr, v_scale_ptr, stride_sc,
    PER_TOKEN: tl.constexpr, chunk_scale_ptr, CHUNK_SCALE: tl.constexpr, Q_SPLIT: tl.constexpr,
    RAW_MAX: tl.constexpr, WARP_SPEC: tl.constexpr, TOKEN_V2: tl.constexpr,
    SCALE_BLOCK: tl.constexpr, QSPLIT_ACC: tl.constexpr, SCALE_SIDES: tl.constexpr,
    SC_NOMASK: tl.constexpr, EX2_F16: tl.constexpr, TILE_M: tl.constexpr,
):
    # fmt: on
    # TILE_M: the work list's rows per tile; BLOCK_M (<= TILE_M) of them are computed
    # work item w: one row tile of one (chunk, KV head) group over one split of the chunk
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
    rows = tile * TILE_M + offs_m
    row_ok = rows < n_sel * G
    req = tl.load(sel_req_ptr + start + rows // G, mask=row_ok, other=0)
    head = kv * G + rows % G
    q = tl.load(
        q_ptr + req[:, None].to(tl.int64) * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    # q to e4m3 per row, the row's scale joins the logits. The largest magnitude maps to 440,
    # not e4m3's max 448: a quotient a rounding above 448 is NaN unless the cast saturates
    # (the GPU's does, Triton's interpreter does not); 440 still rounds to 448
    q_s = tl.maximum(tl.max(tl.abs(q), 1), 1e-30) / 440.0
    q8 = (q / q_s[:, None]).to(tl.float8e4nv)
    q8lo = q8  # Q_SPLIT: the residual, 16x up (|residual| <= 2^-4 |q|: no overflow)
    if Q_SPLIT:
        if QSPLIT_ACC:
            q8lo = (q / q_s[:, None] - q8.to(tl.float32)).to(tl.float8e4nv)
        else:
            q8lo = ((q / q_s[:, None] - q8.to(tl.float32)) * 16.0).to(tl.float8e4nv)
    if CHUNK_SCALE:
        qk_scale = qk_scale * tl.load(chunk_scale_ptr + chunk)
    if not PER_TOKEN:
        qk_scale = qk_scale * tl.load(k_scale_ptr + chunk * stride_sc + kv)
    q_sc = q_s * qk_scale

    c_lo = tl.load(starts_ptr + chunk)
    c_hi = tl.load(ends_ptr + chunk)
    split_len = tl.cdiv(tl.cdiv(c_hi - c_lo, n_split), BLOCK_N) * BLOCK_N
    lo = tl.minimum(c_lo + split * split_len, c_hi)
    hi = tl.minimum(lo + split_len, c_hi)
    full_hi = lo + (tl.maximum(hi - lo, 0) // BLOCK_N) * BLOCK_N
    k_ptrs = k_ptr + lo.to(tl.int64) * stride_kn + kv * stride_kh
    k_ptrs += offs_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = v_ptr + lo.to(tl.int64) * stride_vn + kv * stride_vh
    v_ptrs += offs_n[:, None] * stride_vn + offs_d[None, :]
    sc_ptrs = (lo + offs_n).to(tl.int64) * stride_sc + kv

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    vm = tl.full([], 1.0, tl.float32)  # TOKEN_V2: acc's V unit (P_RANGE / vm)
    # fmt: off
    acc, m_i, l_i, vm = _fp8_inner(
        acc, m_i, l_i, vm, q8, q8lo, q_sc, k_ptrs, v_ptrs, k_desc, v_desc, kv, kv * D, lo, full_hi,
        stride_kn, stride_vn, sc_ptrs, k_scale_ptr, v_scale_ptr, stride_sc,
        BLOCK_N, False, USE_TMA, V_T, PER_TOKEN, Q_SPLIT, RAW_MAX, WARP_SPEC, TOKEN_V2,
        SCALE_BLOCK, QSPLIT_ACC, SCALE_SIDES, SC_NOMASK, EX2_F16,
    )
    if full_hi < hi:
        skip = (full_hi - lo).to(tl.int64)
        acc, m_i, l_i, vm = _fp8_inner(
            acc, m_i, l_i, vm, q8, q8lo, q_sc, k_ptrs + skip * stride_kn, v_ptrs + skip * stride_vn,
            k_desc, v_desc, kv, kv * D, full_hi, hi, stride_kn, stride_vn,
            sc_ptrs + skip * stride_sc, k_scale_ptr, v_scale_ptr, stride_sc,
            BLOCK_N, True, USE_TMA, V_T, PER_TOKEN, Q_SPLIT, RAW_MAX, WARP_SPEC, TOKEN_V2,
            SCALE_BLOCK, QSPLIT_ACC, SCALE_SIDES, SC_NOMASK, EX2_F16,
        )
    # fmt: on

    if PER_TOKEN and SCALE_BLOCK > 0 and (SCALE_SIDES & 2) != 0:  # V per block: l_i P_RANGE up,
        # acc P_RANGE / vm up
        o, lse = merge_finish(m_i - P_LOG2, l_i, acc)
        o = o * vm
    elif RAW_MAX and not PER_TOKEN:  # l_i in units of 1 / P_RANGE: lse back by log2(P_RANGE)
        o, lse = merge_finish(m_i - P_LOG2, l_i, acc)
        o = o * tl.load(v_scale_ptr + chunk * stride_sc + kv)  # the chunk's V scale
    else:
        o, lse = merge_finish(m_i, l_i, acc)
        if not PER_TOKEN:  # the chunk's V scale and the weights' range: o is linear in V
            o = o * (tl.load(v_scale_ptr + chunk * stride_sc + kv) / P_RANGE)
        elif TOKEN_V2:  # acc was in units of P_RANGE / vm
            o = o * (vm / P_RANGE)
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
