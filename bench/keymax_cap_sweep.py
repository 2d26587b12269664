"""One-off: when does capping the key-max grid help the two-stage routed decode step?

The step as the engine runs it: router + grouped shared attention on a high-priority side
stream, paged unique attention on the current stream, then the merge; CUDA-graph replay.
Swept over batch B, unique context U and the key-max cap (programs per SM; none = one
program per (tile, head) item). Also times the key-max route and the unique attention
alone, so a rule can be read off.
Usage on the GPU machine: PYTHONPATH=. python3 bench/keymax_cap_sweep.py  (JSON under $OUT)
"""

import json
import os
import sys

import torch

from moska.bench.common import environment
from moska.bench.kernels_util import DEV, DT, HKV, HQ, SCALE, D, bench_graph, ceilings
from moska.kernels import router
from moska.kernels.merge import merge_selections
from moska.kernels.paged_attention import paged_decode_attention
from moska.kernels.shared_attention import grouped_shared_attention

torch.manual_seed(0)
C, L, TOPK = 256, 4096, 8
S = C * L
B_LIST = [int(x) for x in os.environ.get("B_LIST", "128,256,512,1024").split(",")]
U_LIST = [int(x) for x in os.environ.get("U_LIST", "1024,4096,8192").split(",")]
CAPS = [None, 1, 2, 4]

peak, bw = ceilings()
k = torch.randn(S, HKV, D, device=DEV, dtype=DT)
v = torch.randn_like(k)
offs = torch.arange(0, S + 1, L, dtype=torch.int32, device=DEV)
index = router.build_routing_index(k, offs)
sms = torch.cuda.get_device_properties(DEV).multi_processor_count
high = torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[1])
rows = []
for U in U_LIST:
    for B in B_LIST:
        if B * U > 1024 * 8192:
            continue
        q = torch.randn(B, HQ, D, device=DEV, dtype=DT)
        kc = torch.randn(B * U // 16, 16, HKV, D, device=DEV, dtype=DT)
        vc = torch.randn_like(kc)
        bt = torch.arange(B * U // 16, dtype=torch.int32, device=DEV).view(B, U // 16)
        sl = torch.full((B,), U, dtype=torch.int32, device=DEV)
        row = dict(B=B, U=U)

        def step(progs):
            def run():
                cur = torch.cuda.current_stream()
                high.wait_stream(cur)
                with torch.cuda.stream(high):
                    s_ = router.route(q, index, TOPK, scorer="two_stage", keymax_programs=progs)
                    o_s, lse_s = grouped_shared_attention(q, k, v, offs, s_, SCALE)
                o_u, lse_u = paged_decode_attention(q, kc, vc, bt, sl, SCALE)
                cur.wait_stream(high)
                return merge_selections(o_u, lse_u, o_s, lse_s, s_)

            return run

        ref = step(None)()[0]
        row["unique_ms"] = bench_graph(lambda: paged_decode_attention(q, kc, vc, bt, sl, SCALE))
        s0 = router.route(q, index, TOPK, scorer="two_stage")
        row["shared_ms"] = bench_graph(lambda: grouped_shared_attention(q, k, v, offs, s0, SCALE))
        for cap in CAPS:
            progs = None if cap is None else cap * sms
            name = "none" if cap is None else f"p{cap}"
            out = step(progs)()[0]
            row[f"relerr_{name}"] = float((out.float() - ref.float()).norm() / ref.float().norm())
            row[f"route_{name}_ms"] = bench_graph(
                lambda: router.route(q, index, TOPK, scorer="two_stage", keymax_programs=progs)
            )
            row[f"step_{name}_ms"] = bench_graph(step(progs))
        touched = int(torch.unique(s0.chunk).numel())
        kv_bytes = (touched * L + B * U) * HKV * D * 2 * 2 + S * HKV * index.rank * 2
        flops = 4 * (B * TOPK * L + B * U) * HQ * D + 2 * B * 4 * TOPK * L * HQ * index.rank
        row["floor_ms"] = max(kv_bytes / bw / 1e6, flops / peak / 1e9)
        best = min(CAPS, key=lambda c: row[f"step_{'none' if c is None else f'p{c}'}_ms"])
        row["best_cap"] = best
        print(json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}))
        rows.append(row)
        kc = vc = q = None  # free before the next shape's pools
        torch.cuda.empty_cache()

res = dict(
    environment(sys.argv),
    command="PYTHONPATH=. python3 bench/keymax_cap_sweep.py",
    gemm_peak_tflops=peak,
    copy_GBps=bw,
    shapes=dict(chunks=C, chunk_len=L, Hq=HQ, Hkv=HKV, D=D, rank=index.rank, top_k=TOPK),
    sms=sms,
    rows=rows,
)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "keymax_cap_sweep.json"), "w") as f:
    json.dump(res, f, indent=1)
print(f"{'B':>5} {'U':>5} {'uniq':>6} {'shared':>6} {'floor':>6}  step none/p1/p2/p4 (ms)")
for r in rows:
    steps = "/".join(f"{r[f'step_{n}_ms']:.3f}" for n in ("none", "p1", "p2", "p4"))
    print(
        f"{r['B']:>5} {r['U']:>5} {r['unique_ms']:6.3f} {r['shared_ms']:6.3f} "
        f"{r['floor_ms']:6.3f}  {steps}  best={r['best_cap']}"
    )
