"""The grouped step's harness on CPU at toy sizes (Triton interpreter, fp32), for
`python -m moska.bench.kernels --cpu-dry-run`: the same floors and checks as the GPU run."""

import json
from typing import Any

import torch

from moska.bench.floors import attention_flops, floor_ms
from moska.bench.kernels_baseline import baseline_step
from moska.bench.kernels_router import time_routers
from moska.bench.kernels_util import log, rel
from moska.kernels.merge import merge_selections
from moska.kernels.paged_attention import paged_decode_attention
from moska.kernels.shared_attention import grouped_shared_attention


def grouped_dry_run(ceil: dict) -> list[dict]:
    """The grouped step's harness on CPU at toy sizes (Triton interpreter, fp32): ours,
    the varlen-tile baseline's plan (its CPU path) and dense attention must agree; floors
    and fractions are computed as on the GPU, so the floor check runs too."""
    from moska.bench.common import time_ms
    from moska.bench.kernels_baseline import dense_reference
    from moska.kernels import router
    from moska.kernels.selections import from_topk

    torch.manual_seed(0)
    hq, hkv, d, c, chunk_len, topk, u, bs = 4, 2, 16, 6, 32, 2, 16, 16
    k = torch.randn(c * chunk_len, hkv, d)
    v = torch.randn_like(k)
    offs = torch.arange(0, c * chunk_len + 1, chunk_len, dtype=torch.int32)
    indexes = {r: router.build_routing_index(k, offs, rank=r) for r in (d // 4, d // 2)}
    rows = []
    scale = d**-0.5
    for b, routing in ((4, "uniform"), (6, "zipf")):
        q = torch.randn(b, hq, d)
        kc = torch.randn(b * u // bs, bs, hkv, d)
        vc = torch.randn_like(kc)
        bt = torch.arange(b * u // bs, dtype=torch.int32).view(b, u // bs)
        sl = torch.full((b,), u, dtype=torch.int32)
        if routing == "uniform":
            chunk = torch.rand(b, c).topk(topk, -1).indices
        else:
            w = 1.0 / torch.arange(1, c + 1, dtype=torch.float32) ** 1.1
            chunk = torch.multinomial(w.expand(b, c), topk, replacement=False)
        sel = from_topk(chunk.view(b, 1, topk), hkv, c)
        key = torch.sort(chunk.flatten() * b + torch.arange(b).repeat_interleave(topk)).values
        pr, pc = key % b, key // b
        ku, vu = kc.view(b, u, hkv, d), vc.view(b, u, hkv, d)

        def ours_on(q, sel, kc, vc, bt, sl):
            o_s, lse_s = grouped_shared_attention(q, k, v, offs, sel, scale)
            o_u, lse_u = paged_decode_attention(q, kc, vc, bt, sl, scale)
            return merge_selections(o_u, lse_u, o_s, lse_s, sel)[0]

        def ours(q=q, sel=sel, kc=kc, vc=vc, bt=bt, sl=sl):
            return ours_on(q, sel, kc, vc, bt, sl)

        def base(q=q, pr=pr, pc=pc, ku=ku, vu=vu):
            return baseline_step(q, k, v, offs, pr, pc, ku, vu, scale, tile=8)

        ref = dense_reference(q, k, v, offs, pr, pc, ku, vu, scale)
        row: dict[str, Any] = {
            "B": b,
            "routing": routing,
            "touched_chunks": int(torch.unique(pc).numel()),
        }
        row["ours_relerr"], row["baseline_relerr"] = rel(ours(), ref), rel(base(), ref)
        if not max(row["ours_relerr"], row["baseline_relerr"]) < 1e-4:
            raise SystemExit(f"dry run: fp32 results disagree with dense attention: {row}")
        row["ours_ms"] = time_ms(ours, iters=1, warmup=0)
        row["best_baseline"], row["best_baseline_ms"] = "baseline_t8_cpu", time_ms(base, 1, 0)
        bw, peak = ceil["read_bytes_per_s"], ceil["gemm_flops_per_s"]

        def cost(pairs: int, b=b) -> tuple[int, int]:  # pairs: (chunk, KV head) read
            nbytes = (pairs * chunk_len + b * u * hkv) * d * 2 * 4
            return nbytes, attention_flops(b * hq, topk * chunk_len + u, d)

        row.update(floor_ms(*cost(row["touched_chunks"] * hkv), bw, peak))
        row["roofline_fraction"] = row["floor_ms"] / row["ours_ms"]
        if routing == "uniform":  # the routers in front, timed and floored as on the GPU

            def modes(route_fn, _prefix, _row, q=q, kc=kc, vc=vc, bt=bt, sl=sl):
                return time_ms(lambda: ours_on(q, route_fn(), kc, vc, bt, sl), 1, 0)

            def step_cost(pairs: int) -> tuple[int, int]:
                return cost(pairs)

            def floor_of(nbytes: float, nflops: float, bw=bw, peak=peak) -> dict:
                return floor_ms(nbytes, nflops, bw, peak)

            def alone(fn) -> float:
                return time_ms(fn, 1, 0)

            time_routers(row, q, indexes, topk, 1, modes, step_cost, floor_of, True, alone)
        row["speedup_vs_best_baseline"] = row["best_baseline_ms"] / row["ours_ms"]
        log(json.dumps(row))
        rows.append(row)
    return rows
