"""The ceilings every benchmark floor is computed from, measured in the same run, and the
check that no reported fraction of a floor exceeds 1.0.

Why a read bandwidth: an attention step only reads its KV (the writes are a few rows), and
a read-only stream runs faster than a copy (on the H200 a kernel read at 4.28-4.31 TB/s
against a 4.26 TB/s copy ceiling, so floors from copy bandwidth gave fractions above 1.0).
The read ceiling is the best of several read-only streams over a multi-GiB tensor (torch
reductions and a Triton streaming sum), best of several repetitions each; the copy
bandwidth is kept beside it for reference only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch


def _best_ms(fn: Callable[[], object], reps: int, device: str) -> float:
    """Fastest of `reps` calls (ms): a ceiling is the best the machine did, not the median."""
    fn()  # warm-up (and compile)
    best = math.inf
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            best = min(best, a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def _triton_stream_sum(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A Triton read-only stream: each program sums a contiguous slice, wide vector loads."""
    import triton
    import triton.language as tl

    @triton.jit
    def _stream_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, PER_PROG: tl.constexpr):
        pid = tl.program_id(0)
        base = pid.to(tl.int64) * (BLOCK * PER_PROG)
        acc = tl.zeros([BLOCK], tl.float32)
        for i in tl.range(0, PER_PROG, num_stages=3):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc))

    block, per_prog = 4096, 16
    grid = triton.cdiv(x.numel(), block * per_prog)
    out = torch.empty(grid, dtype=torch.float32, device=x.device)

    def run() -> torch.Tensor:
        _stream_sum_kernel[(grid,)](x, out, x.numel(), BLOCK=block, PER_PROG=per_prog)
        return out

    return run


def measure_ceilings(
    device: str = "cuda", gib: float = 4.0, reps: int = 10, gemm: bool = True
) -> dict:
    """{read_bytes_per_s, read_streams, copy_bytes_per_s, gemm_flops_per_s} of this machine.

    read_bytes_per_s is the best read-only stream (read_streams holds each one's rate);
    the floors divide bytes by it. The GEMM peak is the best 8192^3 bf16 matmul (fp32 on
    CPU). On CPU (dry runs) `gib` should be small: the figures only exercise the code."""
    n = int(gib * 2**30) // 2
    x = torch.empty(n, dtype=torch.bfloat16, device=device).uniform_(-1, 1)
    streams: dict[str, Callable[[], object]] = {
        "sum_bf16": lambda: x.sum(dtype=torch.float32),
        "sum_fp32_view": lambda: x.view(torch.float32).sum(),
        "amax_bf16": lambda: x.amax(),
    }
    if device == "cuda":
        streams["triton_stream_sum"] = _triton_stream_sum(x)
    nbytes = x.numel() * x.element_size()
    rates: dict[str, Any] = {}  # bytes/s, or an error string
    for name, fn in streams.items():
        try:
            rates[name] = nbytes / (_best_ms(fn, reps, device) / 1e3)
        except Exception as e:  # noqa: BLE001 - one stream failing leaves the others
            rates[name + "_err"] = repr(e)[:200]
    good = {k: v for k, v in rates.items() if isinstance(v, float)}
    if not good:
        raise RuntimeError(f"no read-bandwidth stream ran: {rates}")
    y = torch.empty_like(x)
    copy = 2 * nbytes / (_best_ms(lambda: y.copy_(x), reps, device) / 1e3)
    out = {
        "read_bytes_per_s": max(good.values()),
        "read_best_stream": max(good, key=lambda k: good[k]),
        "read_streams": rates,
        "read_tensor_gib": gib,
        "copy_bytes_per_s": copy,
    }
    if gemm:
        m = 8192 if device == "cuda" else 512
        dt = torch.bfloat16 if device == "cuda" else torch.float32
        a = torch.randn(m, m, device=device, dtype=dt)
        b = torch.randn(m, m, device=device, dtype=dt)
        out["gemm_flops_per_s"] = 2 * m**3 / (_best_ms(lambda: a @ b, reps, device) / 1e3)
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def fractions_over(payload: object, limit: float = 1.0, path: str = "") -> list[str]:
    """Every numeric value under a key naming a fraction (of a floor or roofline) that
    exceeds `limit`, as "path=value"; empty when the floors held."""
    over: list[str] = []
    if isinstance(payload, dict):
        for k, v in payload.items():
            p = f"{path}.{k}" if path else str(k)
            if "fraction" in str(k) and isinstance(v, (int, float)) and v > limit:
                over.append(f"{p}={v:.4f}")
            else:
                over += fractions_over(v, limit, p)
    elif isinstance(payload, list):
        for i, v in enumerate(payload):
            over += fractions_over(v, limit, f"{path}[{i}]")
    return over


def check_floors(payload: dict, limit: float = 1.0) -> None:
    """Record the floor check in payload["floor_check"]; call before writing the JSON and
    raise_if_floors_broken(payload) after, so a broken floor still leaves its figures."""
    over = fractions_over(payload, limit)
    payload["floor_check"] = {"limit": limit, "ok": not over, "over": over}
    if over:
        print(f"FLOOR CHECK FAILED: {len(over)} fraction(s) above {limit}: {over[:8]}")


def raise_if_floors_broken(payload: dict) -> None:
    check = payload.get("floor_check", {})
    if not check.get("ok", True):
        raise SystemExit(
            f"a measured time beat its floor ({check['over'][:4]}): the floor's ceiling is "
            "too low; measure a faster read stream before reading these fractions"
        )
