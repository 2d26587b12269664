"""Ceilings the FP8 attention floors need beyond `bandwidth.measure_ceilings` (read stream,
bf16 GEMM), each measured on this machine in the run that uses it, and what the compiler made
of the attention programs.

- `fp8_gemm_rate`: the best e4m3 x e4m3 -> bf16 `torch._scaled_mm` at 8192^3 (FLOP/s): the
  FP8 tensor-core rate the floors divide FP8 products by (not an assumed 2x of bf16's).
- `softmax_rate`: online-softmax scores per second of a Triton probe that does, per score,
  what every attention program must do besides its two products and its loads: one FMA (the
  logit scale), the row max, exp2 and the row sum, on register tiles of the attention
  program's shape (64 x 128 fp32, 4 warps), no memory traffic. The same for bf16 and FP8:
  it is the part FP8 cannot shrink. (A floor of its own: the exp2 alone binds at 16 per
  clock per SM on Hopper, the FP8 products at 2 x 4,096 FLOPs per clock per SM, so at D =
  128 an FP8 attention program spends as long in exp2 as in its tensor cores.)
- `kernel_stats`: registers, spills and shared memory of every compiled variant of the
  given Triton programs, and counts of the PTX instructions that say where time goes
  (wgmma, ex2, e4m3 conversions, shared-memory stores and loads, shuffles, barriers).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import triton
import triton.language as tl

from moska.bench.bandwidth import _best_ms
from moska.kernels.shared_attention_fp8_inner import _pexp2


def fp8_gemm_rate(device: str, m: int = 8192, reps: int = 10) -> dict:
    """{fp8_gemm_flops_per_s} of e4m3 `_scaled_mm` (per-tensor scales, bf16 out), or
    {fp8_gemm_error} where this torch/device has no FP8 GEMM (CPU)."""
    try:
        a = torch.randn(m, m, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(m, m, device=device).to(torch.float8_e4m3fn).t()  # column-major
        one = torch.ones((), device=device)

        def mm() -> torch.Tensor:
            return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

        ms = _best_ms(mm, reps, device)
    except Exception as e:  # noqa: BLE001 - reported; the floors then say they lack it
        return {"fp8_gemm_error": f"{type(e).__name__}: {e}"[:300]}
    return {"fp8_gemm_flops_per_s": 2 * m**3 / (ms / 1e3), "fp8_gemm_shape": [m, m, m]}


@triton.jit
def _softmax_probe(
    a_ptr,
    b_ptr,
    out_ptr,
    ITERS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    EX2_F16: tl.constexpr,
):
    # the score tile comes from a dot, so it has the attention program's MMA accumulator
    # layout (each row within one warp: row max and sum by shuffles, no shared memory);
    # the first probe (session 18 call 1) built it with tl.arange, a blocked layout whose
    # row reductions crossed warps through shared memory: 4x slower than the real kernel
    pid = tl.program_id(0)
    offs_k = tl.arange(0, 16)
    a = tl.load(a_ptr + tl.arange(0, BM)[:, None] * 16 + offs_k[None, :])
    b = tl.load(b_ptr + offs_k[:, None] * BN + tl.arange(0, BN)[None, :])
    s = tl.dot(a, b) + pid.to(tl.float32) * 1e-3
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    for _ in range(ITERS):
        s = s * 0.9990234375 + 0.25  # a fresh score tile each step (the logit-scale FMA)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = _pexp2(s - m_new[:, None], EX2_F16)  # fp32 exp2, or f16 two per instruction
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(p, 1)
        m_i = m_new
    tl.store(out_ptr + pid * BM + tl.arange(0, BM), l_i + m_i)


def softmax_rate(device: str, reps: int = 5, ex2_f16: bool = False) -> dict:
    """{softmax_scores_per_s}: the probe's scores per second over 8 programs per SM
    (`ex2_f16`: its exp2 in f16, two per instruction, as the FP8 program's EX2_F16)."""
    bm, bn = 64, 128
    if device == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs, iters = 8 * sms, 512
    else:  # the interpreter: exercises the code only
        programs, iters = 2, 2
    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(bm, 16, generator=gen) * 0.1).to(device, torch.float16)
    b = (torch.rand(16, bn, generator=gen) * 0.1).to(device, torch.float16)
    out = torch.empty(programs * bm, device=device, dtype=torch.float32)

    def run() -> torch.Tensor:
        mode = (2 if device != "cuda" else 1) if ex2_f16 else 0
        _softmax_probe[(programs,)](a, b, out, ITERS=iters, BM=bm, BN=bn, EX2_F16=mode, num_warps=4)
        return out

    ms = _best_ms(run, reps, device)
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("softmax probe: non-finite output")
    scores = programs * iters * bm * bn
    return {
        "softmax_scores_per_s": scores / (ms / 1e3),
        "softmax_probe": {"programs": programs, "iters": iters, "tile": [bm, bn], "warps": 4},
    }


def measure_fp8_ceilings(device: str) -> dict:
    """The FP8 GEMM rate and the softmax probe's rate (a failing probe reports its error)."""
    out: dict[str, Any] = fp8_gemm_rate(device, m=8192 if device == "cuda" else 64)
    try:
        out.update(softmax_rate(device))
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        out["softmax_error"] = f"{type(e).__name__}: {e}"[:300]
    try:  # the same with f16 exp2 (not a floor: what the EX2_F16 program's softmax may reach)
        f16 = softmax_rate(device, ex2_f16=True)
        out["softmax_f16_exp2_scores_per_s"] = f16["softmax_scores_per_s"]
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        out["softmax_f16_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


_PTX = {
    "wgmma": r"wgmma\.mma_async",
    "mma_sync": r"\bmma\.sync",
    "ex2": r"\bex2\.approx",
    "cvt_e4m3": r"cvt\.rn\.satfinite\.e4m3x2",
    "cvt_bf16": r"cvt\.rn\.bf16x2",
    "st_shared": r"\bst\.shared",
    "ld_shared": r"\bld\.shared",
    "ldmatrix": r"\bldmatrix",
    "stmatrix": r"\bstmatrix",
    "shfl": r"\bshfl\.sync",
    "prmt": r"\bprmt\.b32",
    "bar_sync": r"\bbar\.sync",
    "tma_load": r"cp\.async\.bulk\.tensor",
}


def kernel_stats(*fns: Any) -> list[dict]:
    """Registers, spills, shared bytes and PTX instruction counts of each compiled variant of
    the Triton JIT functions `fns` in this process (its constexprs as the key's text)."""
    rows: list[dict] = []
    for fn in fns:
        for caches in getattr(fn, "device_caches", {}).values():
            cache = caches[0] if isinstance(caches, tuple) else caches
            for key, k in dict(cache).items():
                asm = getattr(k, "asm", None) or {}
                ptx = asm.get("ptx", "") if isinstance(asm, dict) else ""
                meta = getattr(k, "metadata", None)
                row = {
                    "kernel": getattr(fn, "__name__", str(fn)),
                    "key": _short_key(str(key)),
                    "n_regs": getattr(k, "n_regs", None),
                    "n_spills": getattr(k, "n_spills", None),
                    "shared_bytes": getattr(meta, "shared", None),
                    "num_warps": getattr(meta, "num_warps", None),
                    "num_stages": getattr(meta, "num_stages", None),
                }
                row["ptx_counts"] = {n: len(re.findall(p, ptx)) for n, p in _PTX.items()}
                rows.append(row)
    return rows


def _short_key(key: str) -> str:
    """The constexpr part of a cache key (the rest is argument types and alignments)."""
    found = re.findall(r"\('(\w+)', ([^()]*?)\)", key)
    named = [f"{n}={v}" for n, v in found if n.isupper() or n.startswith("num_")]
    return ", ".join(named) if named else key[-400:]
