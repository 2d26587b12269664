"""Tile sweep of the grouped shared kernel per model shape:
`python -m moska.bench.kernels_shapes [--out DIR] [--budget-s S] [--cpu-dry-run]`.

For every shape family (head dim D in 64, 128 x GQA ratio G in 1, 2, 4, 8; Hkv 8, Hq 8G,
bf16) it times `grouped_shared_attention` alone (replayed as a CUDA graph) at B = 64, 256
and 1,024 over 1M shared tokens in 256 chunks of 4,096, top-8 chunks per request, uniform
and Zipf routing, with every candidate tile (CANDIDATES) and with the table's current choice (`default`). Each
candidate's output is checked against the default's, and the default's against the plain
PyTorch reference on a sample of selections. The best tile of a (shape, B) minimises the
sum of its times over the two routings. DIR/kernels_shapes.json holds every time, the best
tile per point, its floor fraction (floor = max(bytes / read bandwidth, FLOPs / matmul
FLOP/s), both ceilings measured in this run, moska/bench/floors.py; `bound` says which one
binds; a fraction above 1.0 fails the run) and `table`: TuneEntry fields per shape, ready to paste
into TABLE in moska/kernels/shared_tuning.py (also printed as Python). A point's
rows_per_group (the table's key) is B * top-k * G / chunks: 2G, 8G and 32G here; an
entry's min_rows is the geometric midpoint between measured points.

`--budget-s` stops starting new points after that many seconds, and skips the candidates
still left a minute later (the JSON says which points are missing); `--head-dims` / `--gqa`
pick shapes (e.g. one device call per head dim, each with its own `--name`);
`--tiles table` times only the table's tile at every point (its floor fractions without the
sweep); `--cpu-dry-run` runs the same code at toy sizes in the interpreter.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

if "--cpu-dry-run" in sys.argv:  # Triton picks its interpreter when it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from moska.bench.bandwidth import check_floors, measure_ceilings, raise_if_floors_broken
from moska.bench.common import capture_graph, environment, time_ms, write_json
from moska.bench.floors import floor_ms, grouped_shared_cost, measure_matmul
from moska.bench.kernels_util import rel
from moska.kernels.selections import Selections, from_topk
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref
from moska.kernels.shared_tuning import GroupedTuning, grouped_tuning

T = GroupedTuning
# Candidate tiles: today's three (64x64 w4, 64x128 w4, 128x128 w8; all TMA, 3 stages) and
# their neighbours: narrower rows for small groups (G = 1, 2 at B = 64 bring 2-4 rows per
# chunk), more stages, 8 warps on 64-row tiles, pointer loads, and more items per SM.
CANDIDATES = [
    T(16, 128, 4, 3),
    T(32, 64, 4, 3),
    T(32, 128, 4, 3),
    T(64, 64, 4, 3),
    T(64, 64, 4, 4),
    T(64, 128, 4, 3),
    T(64, 128, 8, 3),
    T(128, 64, 8, 3),
    T(128, 128, 8, 3),
    T(128, 128, 8, 2),
    T(64, 64, 4, 3, use_tma=False),
    T(64, 64, 4, 3, programs_per_sm=4),
]
# the device run: 1M shared tokens in 4,096-token chunks, top-8; the dry run: toy sizes
GPU: dict[str, Any] = {
    "hkv": 8,
    "chunks": 256,
    "chunk_len": 4096,
    "topk": 8,
    "b_list": (64, 256, 1024),
    "dtype": "bfloat16",
}
DRY: dict[str, Any] = {"hkv": 2, "chunks": 6, "chunk_len": 64, "topk": 2, "b_list": (2, 6)}
DRY["dtype"] = "float32"


def tag(t: GroupedTuning) -> str:
    s = f"m{t.block_m}n{t.block_n}w{t.num_warps}s{t.num_stages}"
    return (
        s
        + ("" if t.use_tma else "_ptr")
        + (f"_p{t.programs_per_sm}" if t.programs_per_sm != 2 else "")
        + ("_ht" if t.half_tail else "")
        + ("_ws" if t.warp_specialize else "")
        + ("_pq" if t.pipe_qk else "")
    )


def selections(b: int, cfg: dict, routing: str, dev: str) -> Selections:
    """Every KV head of each request reads its top-k chunks: uniform (a random top-k) or
    Zipf (s = 1.1 over a shuffled chunk order: a few hot chunks read by many requests)."""
    c, k = cfg["chunks"], cfg["topk"]
    if routing == "uniform":
        chunk = torch.rand(b, c, device=dev).topk(k, -1).indices
    else:
        w = 1.0 / torch.arange(1, c + 1, device=dev, dtype=torch.float32) ** 1.1
        w = w[torch.randperm(c, device=dev)]
        chunk = torch.multinomial(w.expand(b, c), k, replacement=False)
    return from_topk(chunk.view(b, 1, k), cfg["hkv"], c)


def subset(sel: Selections, idx: torch.Tensor) -> Selections:
    return Selections(sel.req[idx], sel.kv_head[idx], sel.chunk[idx])


def timer(dev: str):
    """ms of fn: on the GPU the median of a CUDA graph's replays (a decode step runs the
    kernel in a graph; eager launches would time the launcher's host work as much as the
    tile), eager when capture fails; on the CPU one host-clock call."""
    if dev == "cpu":
        return lambda fn: time_ms(fn, iters=1, warmup=0)
    from triton.testing import do_bench

    def measure(fn) -> float:
        try:
            replay = capture_graph(fn)
        except Exception:  # noqa: BLE001 - time it eagerly instead
            torch.cuda.synchronize()
            replay = fn
        t = do_bench(replay, warmup=10, rep=40, return_mode="median")
        del replay
        return t

    return measure


def sweep_point(q, k, v, offs, sel, scale, d, g, cands, measure, sms, hard_deadline) -> dict:
    """Times of the default and every candidate tile on one problem (ms, and rel err of
    each candidate's output to the default's); candidates past hard_deadline are skipped."""
    n = sel.req.numel()
    rows = n * g / max(1, min(n, (offs.numel() - 1) * k.shape[1]))
    default = grouped_tuning(d, g, rows)

    def run(t: GroupedTuning):
        kw = t.launch_config(sms)
        return grouped_shared_attention(q, k, v, offs, sel, scale, **kw)

    o_def, lse_def = run(default)
    idx = torch.randperm(n, device=q.device)[: min(n, 48)].sort().values  # sorted: a valid sel
    ro, rl = grouped_shared_attention_ref(q, k, v, offs, subset(sel, idx), scale)
    point = {
        "rows_per_group": rows,
        "default": tag(default),
        "default_relerr_vs_ref": rel(o_def[idx], ro),
        "default_lse_relerr_vs_ref": rel(lse_def[idx], rl),
        "default_ms": measure(lambda: run(default)),
        "ms": {},
        "relerr": {},
        "errors": {},
        "default_tuning": dataclasses.asdict(default),
    }
    if not cands:  # --tiles table: the table's tile is the only one timed
        point["ms"][tag(default)], point["relerr"][tag(default)] = point["default_ms"], 0.0
    for t in cands:
        if time.time() > hard_deadline:
            point["errors"][tag(t)] = "skipped: past the time budget"
            continue
        try:
            o, _ = run(t)
            point["relerr"][tag(t)] = rel(o, o_def)
            point["ms"][tag(t)] = measure(lambda t=t: run(t))
        except Exception as e:  # noqa: BLE001 - a tile that fails to compile drops out, say why
            point["errors"][tag(t)] = repr(e)[:300]
    return point


def shape_run(d, g, cfg, k, v, offs, dev, dtype, cands, measure, sms, ceil, deadline) -> dict:
    """Every B and routing of one shape: points, best tile per B, table entries."""
    bw, peak = ceil["read_bytes_per_s"], ceil["matmul_flops_per_s"]
    hkv, L = cfg["hkv"], cfg["chunk_len"]
    out = {"D": d, "G": g, "Hq": hkv * g, "Hkv": hkv, "points": [], "best": [], "missing": []}
    for b in cfg["b_list"]:
        pts = {}
        for routing in ("uniform", "zipf"):
            if time.time() > deadline:
                out["missing"].append(f"B={b} {routing}")
                continue
            sel = selections(b, cfg, routing, dev)
            q = torch.randn(b, hkv * g, d, device=dev, dtype=dtype)
            p = sweep_point(q, k, v, offs, sel, d**-0.5, d, g, cands, measure, sms, deadline + 60)
            touched = int(torch.unique(sel.chunk).numel())
            n = sel.req.numel()
            p["bytes"], p["flops"] = grouped_shared_cost(
                n, g, touched, L, hkv, d, b, k.element_size()
            )
            p.update(floor_ms(p["bytes"], p["flops"], bw, peak))
            p.update(B=b, routing=routing, touched_chunks=touched)
            print(json.dumps({k_: v_ for k_, v_ in p.items() if k_ not in ("ms", "relerr")}))
            out["points"].append(p)
            pts[routing] = p
        if len(pts) < 2:
            continue
        ok = [
            t
            for t in pts["uniform"]["ms"]
            if all(t in p["ms"] and p["relerr"][t] < 2e-2 for p in pts.values())
        ]
        if not ok:
            out["missing"].append(f"B={b}: no tile timed at both routings")
            continue
        best = min(ok, key=lambda t: sum(p["ms"][t] for p in pts.values()))
        def_ms = sum(p["default_ms"] for p in pts.values())
        best_ms = sum(p["ms"][best] for p in pts.values())
        out["best"].append(
            {
                "B": b,
                "rows_per_group": pts["uniform"]["rows_per_group"],
                "tile": best,
                "tuning": next(
                    (dataclasses.asdict(t) for t in cands if tag(t) == best),
                    pts["uniform"]["default_tuning"],
                ),
                "default": pts["uniform"]["default"],
                "speedup_vs_default": def_ms / best_ms,
                **{f"floor_fraction_{r}": p["floor_ms"] / p["ms"][best] for r, p in pts.items()},
                **{f"bound_{r}": p["bound"] for r, p in pts.items()},
                **{
                    f"read_floor_fraction_{r}": p["read_floor_ms"] / p["ms"][best]
                    for r, p in pts.items()
                },
                **{
                    f"default_floor_fraction_{r}": p["floor_ms"] / p["default_ms"]
                    for r, p in pts.items()
                },
            }
        )
    out["table"] = table_entries(d, g, out["best"])
    return out


def table_entries(d: int, g: int, best: list[dict]) -> list[dict]:
    """TuneEntry fields from the best tile per measured rows_per_group: an entry from the
    geometric midpoint to the previous point (0 for the first); equal neighbours merge."""
    entries: list[dict] = []
    prev_rows = None
    for b in sorted(best, key=lambda x: x["rows_per_group"]):
        rows = b["rows_per_group"]
        lo = 0 if prev_rows is None else round(math.sqrt(prev_rows * rows), 1)
        prev_rows = rows
        if entries and entries[-1]["tuning"] == b["tuning"]:
            continue
        entries.append({"head_dim": d, "gqa": g, "min_rows": lo, "tuning": b["tuning"]})
    return entries


def as_python(entries: list[dict]) -> str:
    """The table entries as lines of TABLE in moska/kernels/shared_tuning.py."""
    lines = []
    for e in entries:
        t = GroupedTuning(**e["tuning"])
        fields = ", ".join(
            f"{f.name}={getattr(t, f.name)!r}"
            for f in dataclasses.fields(t)
            if getattr(t, f.name) != f.default
        )
        lines.append(
            f"    TuneEntry({e['head_dim']}, {e['gqa']}, {e['min_rows']}, GroupedTuning({fields})),"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results", help="output directory")
    ap.add_argument("--budget-s", type=float, default=400, help="start no point after this")
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy sizes, interpreter, CPU")
    ap.add_argument("--head-dims", default="64,128", help="comma-separated head dims")
    ap.add_argument("--gqa", default="1,2,4,8", help="comma-separated GQA ratios")
    ap.add_argument("--name", default="kernels_shapes.json", help="output file name")
    ap.add_argument(
        "--tiles",
        choices=("all", "table"),
        default="all",
        help="all: sweep every candidate; table: time only the table's tile (floors, ~10x faster)",
    )
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("moska.bench.kernels_shapes needs a CUDA GPU (or --cpu-dry-run)")
    t0 = time.time()
    deadline = t0 + args.budget_s
    torch.manual_seed(0)
    dev = "cpu" if dry else "cuda"
    cfg = DRY if dry else GPU
    dtype = getattr(torch, cfg["dtype"])
    dims, gqas = args.head_dims.split(","), args.gqa.split(",")
    shapes = [(64, 1), (128, 4)] if dry else [(int(d), int(g)) for d in dims for g in gqas]
    cands = [CANDIDATES[1], CANDIDATES[5]] if dry else CANDIDATES  # two tiles, to be quick
    if args.tiles == "table":
        cands = []
    ceil = measure_ceilings(dev, gib=1 / 64 if dry else 4.0, reps=2 if dry else 10, gemm=False)
    ceil.update(measure_matmul(dev))
    bw, peak = ceil["read_bytes_per_s"], ceil["matmul_flops_per_s"]
    sms = 1 if dry else torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"read {bw / 1e9:.0f} GB/s ({ceil['read_best_stream']}), matmul {peak / 1e12:.0f}")
    print(f"TFLOP/s ({ceil['matmul_dtype']}), {sms} SMs")
    measure = timer(dev)
    res = dict(environment(), device=dev, config=cfg, ceilings=ceil, read_GBps=bw / 1e9)
    res["matmul_tflops"] = peak / 1e12
    res["candidates"] = {tag(t): dataclasses.asdict(t) for t in cands}
    res["shapes"] = []
    s = cfg["chunks"] * cfg["chunk_len"]
    offs = torch.arange(0, s + 1, cfg["chunk_len"], dtype=torch.int32, device=dev)
    for d in sorted({d for d, _ in shapes}):
        k = torch.randn(s, cfg["hkv"], d, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        for dd, g in shapes:
            if dd == d:
                res["shapes"].append(
                    shape_run(
                        d, g, cfg, k, v, offs, dev, dtype, cands, measure, sms, ceil, deadline
                    )
                )
        del k, v
        if dev == "cuda":
            torch.cuda.empty_cache()
    res["table"] = [e for sh in res["shapes"] for e in sh["table"]]
    res["summary"] = summary(res["shapes"])
    res["seconds"] = time.time() - t0
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    bad = [
        f"D{sh['D']} G{sh['G']} B{p['B']} {p['routing']}: {p['default_relerr_vs_ref']:.3g}"
        for sh in res["shapes"]
        for p in sh["points"]
        if not p["default_relerr_vs_ref"] < tol
    ]
    res["correctness"] = {"tol": tol, "ok": not bad, "bad": bad}
    check_floors(res)
    name = "kernels_shapes_cpu_dry_run.json" if dry else args.name
    path = write_json(os.path.join(args.out, name), res)
    print("TABLE entries (moska/kernels/shared_tuning.py):\n" + as_python(res["table"]))
    print("summary:", json.dumps(res["summary"], indent=1), "\nwrote", path)
    raise_if_floors_broken(res)
    if bad:
        raise SystemExit(f"the default tile disagrees with the reference: {bad[:4]}")


def summary(shapes: list[dict]) -> dict:
    """Per shape and B: the best tile, its speedup over the table's default, its floor
    fractions and binding bounds (read or compute) and the read-only fraction the earlier
    runs reported; the points the budget left out."""
    out: dict = {"missing": {}}
    for sh in shapes:
        key = f"D{sh['D']}_G{sh['G']}"
        for b in sh["best"]:
            out[f"{key}_B{b['B']}"] = {
                "best": b["tile"],
                "default": b["default"],
                "speedup_vs_default": round(b["speedup_vs_default"], 3),
                "floor_fraction_uniform": round(b["floor_fraction_uniform"], 3),
                "bound_uniform": b["bound_uniform"],
                "floor_fraction_zipf": round(b["floor_fraction_zipf"], 3),
                "bound_zipf": b["bound_zipf"],
                "read_floor_fraction_uniform": round(b["read_floor_fraction_uniform"], 3),
                "default_floor_fraction_uniform": round(b["default_floor_fraction_uniform"], 3),
            }
        if sh["missing"]:
            out["missing"][key] = sh["missing"]
    return out


if __name__ == "__main__":
    main()
