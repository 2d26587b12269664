"""A library read whole by every request (top_k covering its chunks), the engine's two ways:
`python -m moska.bench.kernels_whole_library [--out DIR] [--budget-s S] [--cpu-dry-run]`
(issue 22, item 4: the engine's seam, attention/shared.one_chunk_span).

Shapes: Llama-3.1-8B attention dims (Hq 32 / Hkv 8 / D 128, G 4, bf16) and D 64 G 8; a
library of 32 chunks x 4,096 tokens (128K) read whole by B = 64, 256 and 1,024 requests
(decode rows). Two ways, each the shared states merged into the rows' own (o, lse) by the
LSE merge (what the decode step runs), replayed from a CUDA graph:

- `grouped`: the grouped kernel over every (chunk, KV head, request) selection (one state
  per chunk: C x Hkv x B x G rows written, then merged);
- `whole`: the one-chunk dispatcher over the library's rows as one span (one state per
  request and KV head; the backend the ONE_CHUNK table picks for the rows).

Both are first checked against each other and an fp32 reference of the first requests'
rows (rel err < 1e-2 in bf16). Floor: max(bytes / read bandwidth, FLOPs / matmul FLOP/s),
measured in this run; no fraction may exceed 1.0.
"""

import argparse
import json
import os
import sys
import time
from typing import Any

if "--cpu-dry-run" in sys.argv:  # Triton picks its interpreter when it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from moska.bench.bandwidth import check_floors, raise_if_floors_broken
from moska.bench.common import environment, write_json
from moska.bench.floors import attention_flops, floor_ms, kernel_ceilings
from moska.bench.kernels_shapes import timer
from moska.bench.kernels_util import rel
from moska.kernels.merge import merge_selections
from moska.kernels.selections import Selections
from moska.kernels.shared_attention import grouped_shared_attention
from moska.kernels.shared_one_chunk import one_chunk_states
from moska.kernels.shared_tuning import one_chunk_backend

GPU: dict[str, Any] = {"hkv": 8, "shapes": ((128, 4), (64, 8)), "chunks": 32, "chunk_len": 4096}
GPU |= {"b_list": (64, 256, 1024), "dtype": "bfloat16", "check_reqs": 2}
DRY: dict[str, Any] = {"hkv": 2, "shapes": ((16, 2),), "chunks": 3, "chunk_len": 24}
DRY |= {"b_list": (3,), "dtype": "float32", "check_reqs": 2}


def every_chunk(b: int, hkv: int, c: int, dev) -> Selections:
    """Every (chunk, KV head, request), sorted by (chunk, kv_head, req): what routing with
    top_k >= C gives (attention/shared.all_chunk_selections), made here without routing."""
    ch = torch.arange(c, device=dev, dtype=torch.int32).repeat_interleave(hkv * b)
    kv = torch.arange(hkv, device=dev, dtype=torch.int32).repeat_interleave(b).repeat(c)
    req = torch.arange(b, device=dev, dtype=torch.int32).repeat(hkv * c)
    return Selections(req, kv, ch)


def ways(p: dict) -> dict:
    q, k, v, offs, sel, sc = p["q"], p["k"], p["v"], p["offs"], p["sel"], p["scale"]
    o_u, lse_u = p["o_u"], p["lse_u"]

    def grouped():
        o, lse = grouped_shared_attention(q, k, v, offs, sel, sc)
        return merge_selections(o_u, lse_u, o, lse, sel)[0]

    def whole():
        o, lse, one = one_chunk_states(q, k, v, sc)
        return merge_selections(o_u, lse_u, o, lse, one)[0]

    return {"grouped": grouped, "whole": whole}


def reference(p: dict, r: int) -> torch.Tensor:
    """fp32 merged output of requests 0..r-1: softmax over the library's keys and the rows'
    own state (o_u, lse_u) together."""
    q, k, v = p["q"][:r].float(), p["k"].float(), p["v"].float()
    hkv, d = k.shape[1], q.shape[-1]
    qh = q.view(r, hkv, -1, d)
    s = torch.einsum("rhgd,shd->rhgs", qh, k) * p["scale"]
    lse_s = torch.logsumexp(s, -1)  # [r, Hkv, G]
    o_s = torch.einsum("rhgs,shd->rhgd", s.softmax(-1), v)
    lse_u = p["lse_u"][:r].float().view(r, hkv, -1)
    o_u = p["o_u"][:r].float().view(r, hkv, -1, d)
    w = torch.sigmoid(lse_s - lse_u)[..., None]  # share of the library part
    return (w * o_s + (1 - w) * o_u).reshape(r, hkv * qh.shape[2], d)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results", help="output directory")
    ap.add_argument("--name", default="kernels_whole_library.json", help="output file name")
    ap.add_argument("--budget-s", type=float, default=60, help="start no point after this")
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy sizes, interpreter, CPU")
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("moska.bench.kernels_whole_library needs a CUDA GPU (or --cpu-dry-run)")
    t0 = time.time()
    torch.manual_seed(0)
    dev, cfg = ("cpu", DRY) if dry else ("cuda", GPU)
    dtype = getattr(torch, cfg["dtype"])
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    ceil, bw, peak = kernel_ceilings(dev, dry, 4, sizes=(8192,))
    print(f"read {bw / 1e9:.0f} GB/s, matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    measure = timer(dev)
    res: dict[str, Any] = dict(environment(), device=dev, config=cfg, ceilings=ceil)
    res |= {"points": [], "missing": []}
    hkv, c, cl = cfg["hkv"], cfg["chunks"], cfg["chunk_len"]
    offs = torch.arange(0, c * cl + 1, cl, dtype=torch.int32, device=dev)
    for d, g in cfg["shapes"]:
        k, v = (torch.randn(c * cl, hkv, d, device=dev, dtype=dtype) for _ in "kv")
        for b in cfg["b_list"]:
            key = f"D{d}_G{g}_B{b}"
            if time.time() > t0 + args.budget_s:
                res["missing"].append(key)
                continue
            q = torch.randn(b, hkv * g, d, device=dev, dtype=dtype)
            p = {"q": q, "k": k, "v": v, "offs": offs, "scale": d**-0.5}
            p |= {"sel": every_chunk(b, hkv, c, dev), "o_u": torch.randn_like(q)}
            p["lse_u"] = torch.randn(b, hkv * g, device=dev) + 8.0  # a part of similar weight
            r = min(b, cfg["check_reqs"])
            ref = reference(p, r)
            pt: dict[str, Any] = {"D": d, "G": g, "B": b, "S": c * cl, "chunks": c, "rel": {}}
            pt["whole_backend"] = one_chunk_backend(d, g, b * g, dtype, dev)
            outs = {name: fn() for name, fn in ways(p).items()}
            for name, o in outs.items():
                pt["rel"][name] = rel(o[:r], ref)
            pt["rel"]["whole_vs_grouped"] = rel(outs["whole"], outs["grouped"])
            pt["ok"] = all(x < tol for x in pt["rel"].values())
            pt["ms"] = {n: measure(fn) for n, fn in ways(p).items()} if pt["ok"] else {}
            el = k.element_size()
            nbytes = c * cl * hkv * d * 2 * el + 4 * b * hkv * g * d * el  # KV, q, o_u, out
            fl = floor_ms(nbytes, attention_flops(b * hkv * g, c * cl, d), bw, peak)
            pt |= {"bytes": nbytes, "floor_ms": fl["floor_ms"], "bound": fl["bound"]}
            for n, ms in pt["ms"].items():
                pt[f"{n}_floor_fraction"] = round(fl["floor_ms"] / ms, 3)
            if pt["ms"]:
                pt["whole_speedup"] = round(pt["ms"]["grouped"] / pt["ms"]["whole"], 3)
            res["points"].append(pt)
            print(json.dumps({key: {k_: pt.get(k_) for k_ in SHOW}}), flush=True)
    res["summary"] = {
        f"D{p['D']}_G{p['G']}_B{p['B']}": {k_: p.get(k_) for k_ in SHOW} for p in res["points"]
    } | {"missing": res["missing"], "wrong": [p["D"] for p in res["points"] if not p["ok"]]}
    res["seconds"] = time.time() - t0
    check_floors(res)
    name = "kernels_whole_library_cpu_dry_run.json" if dry else args.name
    print("wrote", write_json(os.path.join(args.out, name), res))
    raise_if_floors_broken(res)


SHOW: tuple[str, ...] = ("whole_backend", "ms", "whole_speedup", "whole_floor_fraction")
SHOW += ("grouped_floor_fraction", "bound", "ok")

if __name__ == "__main__":
    main()
