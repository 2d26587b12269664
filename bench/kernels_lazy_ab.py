"""Session 23 A/B of the grouped kernel's lazy rescale (MOSKA_LAZY_RESCALE, set per process)
and of smaller tiles at G >= 4: each tile checked against FlashAttention-2 varlen on the same
ragged work (an independent kernel, `kernels_grouped_ragged`) and timed as CUDA-graph replays.

    MOSKA_LAZY_RESCALE=0 PYTHONPATH=. python3 bench/kernels_lazy_ab.py $OUT/lazy0.json
    MOSKA_LAZY_RESCALE=1 PYTHONPATH=. python3 bench/kernels_lazy_ab.py $OUT/lazy1.json
"""

import json
import os
import sys

import torch

from moska.bench.kernels_grouped_ragged import problem, ragged_step, rel
from moska.bench.kernels_shapes import timer
from moska.kernels.shared_attention import grouped_shared_attention

TILES = {  # name: (block_m, block_n, num_warps, num_stages); None: the table's
    "table": None,
    "m64n32w4s3": (64, 32, 4, 3),
    "m64n64w4s2": (64, 64, 4, 2),
    "m64n64w4s3": (64, 64, 4, 3),
    "m64n128w4s3": (64, 128, 4, 3),
    "m128n64w8s3": (128, 64, 8, 3),
    "m128n128w8s3": (128, 128, 8, 3),
}
POINTS = [(128, 4, 1024), (128, 8, 1024), (64, 4, 1024), (64, 8, 1024), (128, 4, 256), (128, 4, 64)]


def main() -> None:
    out_path = sys.argv[1]
    measure = timer("cuda")
    lazy = os.environ.get("MOSKA_LAZY_RESCALE", "0")
    res: dict = {"lazy": lazy, "points": []}
    torch.manual_seed(0)
    for d, g, b in POINTS:
        for routing in ("uniform", "zipf"):
            p = problem(256, 4096, 8, d, g, b, 8, routing, torch.bfloat16, "cuda")
            args = (p["q"], p["k_cm"], p["v_cm"], p["sel"], p["cu_k"], g, d**-0.5, b * g)
            o_ref, lse_ref = ragged_step("flash", *args)
            pt: dict = {"D": d, "G": g, "B": b, "routing": routing, "ms": {}, "err": {}}
            for name, t in TILES.items():
                kw = (
                    {}
                    if t is None
                    else dict(zip(("block_m", "block_n", "num_warps", "num_stages"), t))
                )

                def fn(kw=kw, p=p, d=d):
                    return grouped_shared_attention(
                        p["q"], p["k"], p["v"], p["offs"], p["sel"], d**-0.5, **kw
                    )

                try:
                    o, lse = fn()
                    pt["err"][name] = [rel(o, o_ref), rel(lse, lse_ref)]
                    if max(pt["err"][name]) < 1e-2:
                        pt["ms"][name] = measure(fn)
                except Exception as e:  # noqa: BLE001
                    pt["err"][name] = f"{type(e).__name__}: {e}"[:200]
            print(
                f"lazy={lazy} D{d} G{g} B{b} {routing}:",
                " ".join(f"{n} {t:.3f}" for n, t in pt["ms"].items()),
                "| bad:",
                [n for n in pt["err"] if n not in pt["ms"]],
                flush=True,
            )
            res["points"].append(pt)
            del p
            torch.cuda.empty_cache()
            with open(out_path, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
