"""Kernel times (torch profiler) of eager calls of each ragged backend and the Triton
grouped kernel at B = 1,024: torch's cuDNN ragged path rebuilds its cuDNN graph on every
call (~45 ms of host work) and so cannot be timed as a CUDA-graph replay; the profiler
sees its kernel alone (`kernels_util.kernel_breakdown`: us per call of each kernel; the
kept JSON, written at 3d528fa, lists [name, ms, launches] rows). Session 23 (#22.2):

    PYTHONPATH=. python3 bench/kernels_grouped_ragged_profile.py
"""

import json
import os

import torch

from moska.bench.kernels_grouped_ragged import problem, ragged_step
from moska.bench.kernels_util import kernel_breakdown
from moska.kernels.shared_attention import grouped_shared_attention


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
            us = kernel_breakdown(fn, reps=5)  # us per call of each kernel
            out[f"D{d}_G{g}_{name}"] = us
            print(f"D{d} G{g} {name}: {sum(us.values()) / 1e3:.3f} ms/call", us, flush=True)
        del p
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "prof.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
