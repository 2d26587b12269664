"""Kernel times (torch profiler) of eager calls of each ragged backend and the Triton
grouped kernel at B = 1,024: torch's cuDNN ragged path rebuilds its cuDNN graph on every
call (~45 ms of host work) and so cannot be timed as a CUDA-graph replay; the profiler
sees its kernel alone. Session 23 (#22.2):

    PYTHONPATH=. python3 bench/kernels_grouped_ragged_profile.py
"""

import json
import os

import torch
from torch.profiler import ProfilerActivity, profile

from moska.bench.kernels_grouped_ragged import problem, ragged_step
from moska.kernels.shared_attention import grouped_shared_attention


def kernel_rows(fn, calls: int = 5) -> list[tuple[str, float, float]]:
    """(kernel name, ms per call, launches per call), slowest first."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((e.key[:90], t / calls / 1e3, e.count / calls))
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    out = {}
    for d, g in ((128, 4), (128, 8), (64, 8)):
        p = problem(256, 4096, 8, d, g, 1024, 8, "uniform", torch.bfloat16, "cuda")
        args = (p["q"], p["k_cm"], p["v_cm"], p["sel"], p["cu_k"], g, d**-0.5, 1024 * g)
        fns = {
            "cudnn": lambda args=args: ragged_step("cudnn", *args),
            "flash": lambda args=args: ragged_step("flash", *args),
            "triton": lambda p=p, d=d: grouped_shared_attention(
                p["q"], p["k"], p["v"], p["offs"], p["sel"], d**-0.5
            ),
        }
        for name, fn in fns.items():
            rows = kernel_rows(fn)
            out[f"D{d}_G{g}_{name}"] = rows[:6]
            print(f"D{d} G{g} {name}: {sum(r[1] for r in rows):.3f} ms/call", rows[:4], flush=True)
        del p
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "prof.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
