"""One-off: tile shapes of the grouped shared attention in a routed decode step.

1M shared tokens in 256 chunks of 4096, top-8 chunks per request (uniform and Zipf), so a
(chunk, KV head) group holds about B/8 query rows. Times each config as a CUDA-graph replay,
with its relative error against the default config, and the fraction of the kernel's own
floor (chunk bytes over the copy bandwidth, FLOPs over the GEMM peak, both measured here).
Usage on the GPU machine: PYTHONPATH=. python3 bench/grouped_shared_sweep.py  (JSON in $OUT)
"""

import json
import os
import sys

import torch

from moska.bench.common import environment
from moska.bench.kernels_grouped import zipf_pairs
from moska.bench.kernels_util import DEV, DT, HKV, HQ, SCALE, D, bench_graph, ceilings, rel
from moska.bench.kernels_util import sorted_sel
from moska.kernels.shared_attention import grouped_shared_attention

torch.manual_seed(0)
C, L, TOPK = 256, 4096, 8
S = C * L
B_LIST = [int(x) for x in os.environ.get("B_LIST", "256,512,1024,2048").split(",")]
# (block_m, block_n, num_warps, num_stages, warp_specialize)
CONFIGS = [
    (64, 64, 4, 3, False),
    (64, 64, 4, 4, False),
    (64, 128, 4, 2, False),
    (64, 128, 4, 3, False),
    (128, 64, 8, 3, False),
    (128, 64, 8, 4, False),
    (128, 128, 8, 2, False),
    (128, 128, 8, 3, False),
    (128, 128, 8, 3, True),
    (128, 64, 8, 3, True),
]

peak, bw = ceilings()
k = torch.randn(S, HKV, D, device=DEV, dtype=DT)
v = torch.randn_like(k)
offs = torch.arange(0, S + 1, L, dtype=torch.int32, device=DEV)
rows = []
for B in B_LIST:
    for routing in ("uniform", "zipf"):
        if routing == "zipf" and B != 1024:
            continue
        q = torch.randn(B, HQ, D, device=DEV, dtype=DT)
        if routing == "uniform":
            chunks = torch.rand(B, C, device=DEV).topk(TOPK, -1).indices
        else:
            chunks = zipf_pairs(B, C, TOPK)[1].view(B, TOPK)
        sel = sorted_sel(chunks, C)
        ref = grouped_shared_attention(q, k, v, offs, sel, SCALE)[0]
        touched = int(torch.unique(chunks).numel())
        floor = max(touched * L * HKV * D * 4 / bw / 1e6, 4 * B * TOPK * L * HQ * D / peak / 1e9)
        row = dict(B=B, routing=routing, rows_per_group=B * TOPK * (HQ // HKV) / C, floor_ms=floor)
        row["default_ms"] = bench_graph(lambda: grouped_shared_attention(q, k, v, offs, sel, SCALE))
        for bm, bn, w, st, ws in CONFIGS:
            name = f"m{bm}n{bn}w{w}s{st}{'_ws' if ws else ''}"
            kw = dict(
                block_m=bm, block_n=bn, num_warps=w, num_stages=st, use_tma=True, warp_specialize=ws
            )
            try:
                out = grouped_shared_attention(q, k, v, offs, sel, SCALE, **kw)[0]
                row[f"{name}_relerr"] = rel(out, ref)
                row[f"{name}_ms"] = bench_graph(
                    lambda kw=kw: grouped_shared_attention(q, k, v, offs, sel, SCALE, **kw)
                )
            except Exception as e:  # noqa: BLE001 - a config the compiler rejects
                row[f"{name}_err"] = repr(e)[-200:]
        times = {a[:-3]: b for a, b in row.items() if a.endswith("_ms") and a != "floor_ms"}
        row["best"] = min(times, key=times.get)
        print(json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}))
        rows.append(row)

# where the two-stage router's time goes at B = 1024 (GPU time per kernel, us)
from moska.bench.kernels_util import kernel_breakdown  # noqa: E402
from moska.kernels import router  # noqa: E402

index = router.build_routing_index(k, offs)
q = torch.randn(1024, HQ, D, device=DEV, dtype=DT)
route_kernels = kernel_breakdown(lambda: router.route(q, index, TOPK, scorer="two_stage"))
print("two-stage route kernels (us):", json.dumps(route_kernels))

res = dict(
    environment(sys.argv),
    command="PYTHONPATH=. python3 bench/grouped_shared_sweep.py",
    gemm_peak_tflops=peak,
    copy_GBps=bw,
    shapes=dict(chunks=C, chunk_len=L, Hq=HQ, Hkv=HKV, D=D, top_k=TOPK, dtype="bfloat16"),
    rows=rows,
    route_two_stage_b1024_kernels_us=route_kernels,
)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "grouped_shared_sweep.json"), "w") as f:
    json.dump(res, f, indent=1)
for r in rows:
    t = {a[:-3]: b for a, b in r.items() if a.endswith("_ms") and a != "floor_ms"}
    best = r["best"]
    print(
        f"B={r['B']:>5} {r['routing']:>7} rows/group={r['rows_per_group']:.0f} "
        f"floor={r['floor_ms']:.3f} default={t['default']:.3f} "
        f"({r['floor_ms'] / t['default']:.2f}) "
        f"best={best} {t[best]:.3f} ({r['floor_ms'] / t[best]:.2f})"
    )
