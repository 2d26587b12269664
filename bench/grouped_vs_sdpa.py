"""One-off: is 128 query rows per (chunk, KV head) hard for everyone, or only for us?

A routed decode step at B = 1024 with top-8 of 256 chunks of 4096 tokens gives each
(chunk, KV head) group 32 requests x 4 query heads = 128 rows. The same arithmetic as a
plain batched attention: batch 256 chunks, 8 heads, 128 queries, 4096 keys, no mask. Timed
with SDPA flash and cuDNN (packed, dense: no routing, no gather) next to our grouped kernel
on the routed selections, plus a few of our tile shapes with more CTAs per SM.
Usage on the GPU machine: PYTHONPATH=. python3 bench/grouped_vs_sdpa.py  (JSON in $OUT)
"""

import json
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from moska.bench.common import environment
from moska.bench.kernels_util import DEV, DT, HKV, HQ, SCALE, D, bench_graph, ceilings, rel
from moska.bench.kernels_util import sorted_sel
from moska.kernels.shared_attention import grouped_shared_attention

torch.manual_seed(0)
C, L, TOPK = 256, 4096, 8
peak, bw = ceilings()
k = torch.randn(C * L, HKV, D, device=DEV, dtype=DT)
v = torch.randn_like(k)
offs = torch.arange(0, C * L + 1, L, dtype=torch.int32, device=DEV)
rows = []
for B in (1024, 2048):
    m = B * TOPK * (HQ // HKV) // C  # query rows per (chunk, KV head)
    q = torch.randn(B, HQ, D, device=DEV, dtype=DT)
    sel = sorted_sel(torch.rand(B, C, device=DEV).topk(TOPK, -1).indices, C)
    fl = 4 * B * TOPK * L * HQ * D
    row = dict(B=B, rows_per_group=m, gflop=fl / 1e9)
    ref = grouped_shared_attention(q, k, v, offs, sel, SCALE)[0]
    row["ours_default_ms"] = bench_graph(
        lambda: grouped_shared_attention(q, k, v, offs, sel, SCALE)
    )
    for bm, bn, w, st in ((64, 32, 4, 4), (64, 32, 4, 6), (64, 64, 4, 2), (128, 32, 8, 4)):
        kw = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, use_tma=True)
        name = f"ours_m{bm}n{bn}w{w}s{st}"
        try:
            row[name + "_relerr"] = rel(
                grouped_shared_attention(q, k, v, offs, sel, SCALE, **kw)[0], ref
            )
            row[name + "_ms"] = bench_graph(
                lambda kw=kw: grouped_shared_attention(q, k, v, offs, sel, SCALE, **kw)
            )
        except Exception as e:  # noqa: BLE001
            row[name + "_err"] = repr(e)[-200:]
    # the same FLOPs and bytes as one dense batched attention: [C, Hkv, m, D] x [C, Hkv, L, D]
    qd = torch.randn(C, HKV, m, D, device=DEV, dtype=DT)
    kd = k.view(C, L, HKV, D).transpose(1, 2)  # strided view of the same pool
    vd = v.view(C, L, HKV, D).transpose(1, 2)
    for name, be in (
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
    ):

        def run(be=be):
            with sdpa_kernel(be):
                return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, scale=SCALE)

        try:
            run()
            row[name + "_ms"] = bench_graph(run)
        except Exception as e:  # noqa: BLE001
            row[name + "_err"] = repr(e)[-200:]
    row["floor_ms"] = max(C * L * HKV * D * 4 / bw / 1e6, fl / peak / 1e9)
    for key in [a for a in row if a.endswith("_ms") and a != "floor_ms"]:
        row[key[:-3] + "_tflops"] = fl / row[key] / 1e9
    print(json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}))
    rows.append(row)
res = dict(environment(sys.argv), command="PYTHONPATH=. python3 bench/grouped_vs_sdpa.py")
res.update(gemm_peak_tflops=peak, copy_GBps=bw, rows=rows)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "grouped_vs_sdpa.json"), "w") as f:
    json.dump(res, f, indent=1)
for r in rows:
    t = {a[:-7]: round(b) for a, b in r.items() if a.endswith("_tflops")}
    print(f"B={r['B']} rows/group={r['rows_per_group']} floor={r['floor_ms']:.3f} ms TFLOP/s {t}")
