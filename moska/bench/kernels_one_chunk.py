"""One chunk read by many requests, per model shape, against flash and cuDNN:
`python -m moska.bench.kernels_one_chunk [--out DIR] [--budget-s S] [--cpu-dry-run]
[--warm I/N]` (issue 22, item 4).

Shapes: head dim D in 64, 128 x GQA ratio G in 1, 2, 4, 8 (Hkv 8, bf16); one chunk of
128K tokens read by every KV head of B = 16, 64, 256, 1,024 requests. Per point:

1. correctness (before any timing): every Triton variant, the SDPA paths (cuDNN, flash,
   through `sdpa_one_chunk`, which returns the LSE) and the dispatching launcher
   (`one_chunk_attention`, backend from `shared_tuning.ONE_CHUNK`) against an fp32
   reference of the first requests' rows, o and lse (rel err < 1e-2 in bf16); a wrong
   variant is reported and never timed;
2. times, each replayed from a CUDA graph (what a decode step does): the Triton variants,
   the launcher, and the baselines: torch SDPA flash and cuDNN on the packed rows ([1, Hkv,
   B * G, D], K/V strided views of the pool, no copies inside the timing), each also timed
   eagerly; the best baseline is the fastest of the four.

Floors: max(bytes / read bandwidth, FLOPs / matmul FLOP/s), both measured in this run. The
summary gives per point the launcher's backend, time, floor fraction and ratio to the best
baseline (> 1: faster), the best Triton variant's, and `one_chunk_table`: per head dim the
fewest rows per KV head from which an SDPA backend beat every Triton variant at every
larger point (the `ONE_CHUNK` entries to paste into moska/kernels/shared_tuning.py).
`--warm I/N` compiles the Triton variants of units i, i + N, ... (one untimed call at the
run's sizes) and exits (N processes fill the Triton cache before the timed run). The table printed last is
what bench/device_session16_shapes.sh shows.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

if "--cpu-dry-run" in sys.argv:  # Triton picks its interpreter when it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moska.bench.bandwidth import check_floors, raise_if_floors_broken
from moska.bench.common import capture_graph, environment, write_json
from moska.bench.floors import attention_flops, kernel_ceilings
from moska.bench.kernels_one_chunk_report import one_chunk_table, point_summary, print_table
from moska.bench.kernels_shapes import tag
from moska.bench.kernels_shapes import timer as graph_timer
from moska.bench.kernels_util import rel
from moska.kernels.shared_one_chunk import (
    one_chunk_attention,
    sdpa_one_chunk,
)
from moska.kernels.shared_tuning import GroupedTuning, grouped_tuning, one_chunk_backend

T = GroupedTuning
PQ = {"pipe_qk": True}  # QK^T one key block ahead of the softmax (shared_attention_pipe.py)
# Triton variants beside the table's tile: few rows per KV head (read-bound, split-KV) try
# more or fewer items per SM; many rows (compute-bound) try other tiles and stages; both try
# the pipelined key loop on tiles whose two score tiles fit in registers. (128 x 128 x 4
# stages at D = 128 needs 296 KB of shared memory: over the H200's 227.)
SMALL = {
    128: [T(64, 64, 4, 3, programs_per_sm=4), T(128, 128, 8, 3, programs_per_sm=1),
          T(64, 64, 4, 3, **PQ)],
    64: [T(64, 128, 4, 3, programs_per_sm=4), T(128, 64, 8, 3), T(64, 128, 4, 3, **PQ)],
}  # fmt: skip
LARGE = {
    128: [T(128, 128, 8, 3), T(128, 128, 8, 2), T(128, 64, 8, 3, **PQ)],
    64: [T(128, 64, 8, 3), T(128, 64, 8, 4), T(128, 128, 8, 3, **PQ), T(64, 128, 4, 3, **PQ)],
}
SMALL_ROWS = 512  # rows per KV head below which the SMALL variants run
GPU: dict[str, Any] = {"hkv": 8, "dims": (128, 64), "gqa": (4, 8, 2, 1), "dtype": "bfloat16"}
GPU |= {"b_list": (16, 64, 256, 1024), "single_len": 131072, "check_reqs": 3}
DRY: dict[str, Any] = {"hkv": 2, "dims": (16,), "gqa": (1, 4), "dtype": "float32"}
DRY |= {"b_list": (2, 5), "single_len": 45, "check_reqs": 2}
DRY_TILES = [T(16, 16, 4, 1, use_tma=False), T(16, 16, 4, 1, use_tma=False, pipe_qk=True)]
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def jobs(cfg: dict) -> list[tuple[int, int, int]]:
    """(D, G, B) in run order: by G first (the G >= 4 points, where cuDNN won, lead), so a
    run cut short by its budget misses the least telling points."""
    return [(d, g, b) for g in cfg["gqa"] for d in cfg["dims"] for b in cfg["b_list"]]


def variants(d: int, g: int, rows: int, dry: bool, table_only: bool = False) -> dict:
    """The table's tile ("table:<tag>") first, then the variants for this many rows (none
    with `table_only`)."""
    table = grouped_tuning(d, g, rows)
    cands = DRY_TILES if dry else (SMALL if rows < SMALL_ROWS else LARGE)[d]
    cands = cands[:1] if table_only and dry else [] if table_only else cands
    out = {f"table:{tag(table)}": table}
    return out | {tag(t): t for t in cands if t != table}


def problem(cfg: dict, kv: tuple, d: int, g: int, b: int, dev: str, dtype) -> dict:
    k, v = kv
    q = torch.randn(b, cfg["hkv"] * g, d, device=dev, dtype=dtype)
    return {"q": q, "k": k, "v": v, "scale": d**-0.5}


def reference(p: dict, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (o [Hkv, r, G, D], lse [Hkv, r, G]) of requests 0..r-1."""
    q, k, v = p["q"][:r].float(), p["k"].float(), p["v"].float()
    hkv, d = k.shape[1], q.shape[-1]
    qh = q.view(r, hkv, -1, d).permute(1, 0, 2, 3)  # [Hkv, r, G, D]
    s = torch.einsum("hrgd,shd->hrgs", qh, k) * p["scale"]
    return torch.einsum("hrgs,shd->hrgd", s.softmax(-1), v), torch.logsumexp(s, -1)


def calls(p: dict, vs: dict, sms: int) -> dict[str, Callable[[], Any]]:
    """name -> fn of everything checked and timed (the launcher's output layout). Few rows:
    the table's tile also without the cached work list (":replan", an A/B of the cache)."""
    q, k, v, sc = p["q"], p["k"], p["v"], p["scale"]
    out: dict[str, Callable[[], Any]] = {}
    for n, t in vs.items():
        kw = t.launch_config(sms)
        out[f"triton:{n}"] = partial(one_chunk_attention, q, k, v, sc, backend="triton", **kw)
        if n.startswith("table:") and q.shape[0] * q.shape[1] // k.shape[1] < SMALL_ROWS:
            out[f"triton:{n}:replan"] = partial(
                one_chunk_attention, q, k, v, sc, backend="triton", cache_plan=False, **kw
            )
    if q.device.type == "cuda":
        out |= {f"sdpa:{b}": partial(sdpa_one_chunk, q, k, v, sc, b) for b in SDPA}
    out["dispatch"] = partial(one_chunk_attention, q, k, v, sc)
    return out


def check(p: dict, fns: dict, r: int, tol: float) -> dict:
    ro, rl = reference(p, r)
    b, (hkv, _, g, d) = p["q"].shape[0], ro.shape
    res: dict[str, Any] = {}
    for name, fn in fns.items():
        try:
            o, lse = fn()
            o, lse = o.view(hkv, b, g, d)[:, :r], lse.view(hkv, b, g)[:, :r]
            res[name] = {"o": rel(o, ro), "lse": rel(lse, rl)}
            res[name]["ok"] = res[name]["o"] < tol and res[name]["lse"] < tol
        except Exception as e:  # noqa: BLE001 - a variant that fails is reported, not timed
            res[name] = {"ok": False, "error": repr(e)[:300]}
    return res


def baselines(p: dict, g: int, dev: str, prepare) -> tuple[dict, dict]:
    """flash / cuDNN through F.scaled_dot_product_attention on packed rows made outside the
    timing (the libraries' best case, no LSE asked for): each as a graph replay and eagerly.
    Returns ({name: fn to time}, {name: error})."""
    q, k, v, sc = p["q"], p["k"], p["v"], p["scale"]
    b, _, d = q.shape
    hkv = k.shape[1]
    qp = q.view(b, hkv, g, d).transpose(0, 1).reshape(1, hkv, b * g, d)
    kt, vt = k.unsqueeze(0).transpose(1, 2), v.unsqueeze(0).transpose(1, 2)
    runs: dict[str, Callable] = {}
    errors: dict[str, str] = {}
    for name, be in (SDPA if dev == "cuda" else {"math": SDPBackend.MATH}).items():

        def fn(be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(qp, kt, vt, scale=sc)

        try:
            fn()
            runs[f"{name}_graph"], runs[f"{name}_eager"] = prepare(fn), fn
        except Exception as e:  # noqa: BLE001 - a backend refusing the shape says why
            errors[name] = repr(e)[:300]
    return runs, errors


def run_point(cfg, kv, d, g, b, dev, dtype, sms, prepare, measure, tol, dry, n_rounds=2) -> dict:
    """Check every call, then time them all in `n_rounds` rounds (each in a rotated order,
    every other one reversed; a call's time is the lowest of its round medians, and the
    summary's `*_paired` ratios compare calls round by round: clock drift weighs less)."""
    p = problem(cfg, kv, d, g, b, dev, dtype)
    rows = b * g
    pt: dict[str, Any] = {"D": d, "G": g, "B": b, "S": cfg["single_len"], "rows": rows}
    pt["dispatch_backend"] = one_chunk_backend(d, g, rows, dtype, dev)
    fns = calls(p, variants(d, g, rows, dry, cfg.get("table_only", False)), sms)
    pt["check"] = check(p, fns, min(b, cfg["check_reqs"]), tol)
    pt["errors"], runs = {}, {}
    for name, fn in fns.items():
        if pt["check"][name]["ok"]:
            try:
                runs[name] = prepare(fn)
            except Exception as e:  # noqa: BLE001
                pt["errors"][name] = repr(e)[:300]
    base_runs, base_errors = baselines(p, g, dev, prepare)
    runs |= {f"base:{k}": v for k, v in base_runs.items()}
    rounds = rotated_rounds(runs, n_rounds, measure)
    best = {k: min(v) for k, v in rounds.items()}
    pt["ms"] = {k: v for k, v in best.items() if not k.startswith("base:")}
    pt["baselines"] = {"ms": {k[5:]: v for k, v in best.items() if k.startswith("base:")}}
    pt["baselines"]["errors"], pt["rounds_ms"] = base_errors, rounds
    el = p["k"].element_size()
    hkv = cfg["hkv"]
    nbytes = cfg["single_len"] * hkv * d * 2 * el + 2 * b * hkv * g * d * el
    pt["bytes"], pt["flops"] = nbytes, attention_flops(rows * hkv, cfg["single_len"], d)
    return pt


def rotated_rounds(
    runs: dict[str, Callable], n_rounds: int, measure: Callable[[Callable], float]
) -> dict[str, list[float]]:
    """Each call's time (`measure(fn)`, ms) in each of `n_rounds` rounds, the calls' order
    rotated from round to round and every other round reversed: no call is always first."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for i in range(n_rounds):
        order = names[i * len(names) // n_rounds :] + names[: i * len(names) // n_rounds]
        for name in order if i % 2 == 0 else reversed(order):
            times[name].append(measure(runs[name]))
    return times


def timers(dev: str, rep_ms: float = 25) -> tuple[Callable, Callable]:
    """(prepare, measure): prepare(fn) captures fn as a CUDA graph and returns its replay
    (fn itself where capture fails, printed); measure(fn) is the median ms of triton's
    do_bench (L2 flushed between calls). On the CPU: fn itself, and the host clock."""
    if dev != "cuda":
        return (lambda fn: fn), graph_timer(dev)
    from triton.testing import do_bench

    def measure(fn) -> float:
        return do_bench(fn, warmup=5, rep=rep_ms, return_mode="median")

    def prepare(fn):
        try:
            return capture_graph(fn)
        except Exception as e:  # noqa: BLE001 - timed eagerly instead, and said so
            print(f"graph capture failed, timed eagerly: {e!r}"[:200], flush=True)
            torch.cuda.synchronize()
            return fn

    return prepare, measure


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results", help="output directory")
    ap.add_argument("--name", default="kernels_one_chunk.json", help="output file name")
    ap.add_argument("--budget-s", type=float, default=120, help="start no point after this")
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy sizes, interpreter, CPU")
    ap.add_argument("--warm", default=None, help="I/N: compile the units i % N == I, then exit")
    ap.add_argument("--rounds", type=int, default=2, help="timing rounds per call")
    ap.add_argument("--rep-ms", type=float, default=25, help="do_bench's rep per round")
    ap.add_argument("--table-only", action="store_true", help="no Triton variants")
    ap.add_argument("--b-list", default=None, help="comma-separated B (default: all)")
    ap.add_argument("--gqa", default=None, help="comma-separated G (default: all)")
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("moska.bench.kernels_one_chunk needs a CUDA GPU (or --cpu-dry-run)")
    t0 = time.time()
    torch.manual_seed(0)
    dev, cfg = ("cpu", dict(DRY)) if dry else ("cuda", dict(GPU))
    cfg["table_only"] = args.table_only
    for key, arg in (("b_list", args.b_list), ("gqa", args.gqa)):
        if arg:
            cfg[key] = tuple(int(x) for x in arg.split(","))
    dtype = getattr(torch, cfg["dtype"])
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    sms = 1 if dry else torch.cuda.get_device_properties(dev).multi_processor_count
    if args.warm:
        i, n = (int(x) for x in args.warm.split("/"))
        warm(cfg, i, n, dev, dtype, sms, dry)
        return
    ceil, bw, peak = kernel_ceilings(dev, dry, 6)
    print(f"read {bw / 1e9:.0f} GB/s, matmul {peak / 1e12:.0f} TFLOP/s, {sms} SMs", flush=True)
    prepare, measure = timers(dev, args.rep_ms)
    res: dict[str, Any] = dict(environment(), device=dev, config=cfg, ceilings=ceil)
    res |= {"read_GBps": bw / 1e9, "matmul_tflops": peak / 1e12, "points": [], "missing": []}
    pools: dict[int, tuple] = {}  # D -> (k, v) of the chunk
    for d, g, b in jobs(cfg):
        if time.time() > t0 + args.budget_s:
            res["missing"].append(f"D{d}_G{g}_B{b}")
            continue
        if d not in pools:
            shape = (cfg["single_len"], cfg["hkv"], d)
            pools[d] = tuple(torch.randn(shape, device=dev, dtype=dtype) for _ in range(2))
        pt = run_point(
            cfg, pools[d], d, g, b, dev, dtype, sms, prepare, measure, tol, dry, args.rounds
        )
        res["points"].append(pt)
        print(json.dumps({f"D{d}_G{g}_B{b}": point_summary(pt, bw, peak)}), flush=True)
        if not dry:  # a run cut short by its timeout still leaves every finished point
            write_json(os.path.join(args.out, args.name), res)
    summ: dict[str, Any] = {"missing": res["missing"]}
    summ["wrong"] = [
        f"D{p['D']}_G{p['G']}_B{p['B']} {n}" for p in res["points"]
        for n, c in p["check"].items() if not c["ok"]
    ]  # fmt: skip
    for p in res["points"]:
        summ[f"D{p['D']}_G{p['G']}_B{p['B']}"] = point_summary(p, bw, peak)
    res["summary"], res["one_chunk_table"] = summ, one_chunk_table(res["points"])
    res["seconds"] = time.time() - t0
    check_floors(res)
    name = "kernels_one_chunk_cpu_dry_run.json" if dry else args.name
    path = write_json(os.path.join(args.out, name), res)
    print("wrong:", summ["wrong"][:6], "missing:", summ["missing"][:6])
    print("one_chunk_table:", json.dumps(res["one_chunk_table"]))
    print("wrote", path)
    print_table(summ)
    raise_if_floors_broken(res)


def warm(cfg: dict, i: int, n: int, dev: str, dtype, sms: int, dry: bool) -> None:
    """Run the Triton variants of units i, i + n, ... once at every B that times them, at the
    run's sizes (the same specializations; compiles, nothing timed): a unit is one (D, G,
    tile)."""
    units: dict[tuple, list[int]] = {}
    for d, g, b in jobs(cfg):
        for t in variants(d, g, b * g, dry, cfg.get("table_only", False)).values():
            units.setdefault((d, g, t), []).append(b)
    pools: dict[int, tuple] = {}
    for (d, g, t), bs in list(units.items())[i::n]:
        if d not in pools:
            shape = (cfg["single_len"], cfg["hkv"], d)
            pools[d] = tuple(torch.randn(shape, device=dev, dtype=dtype) for _ in range(2))
        kv = pools[d]
        for b in bs:
            p = problem(cfg, kv, d, g, b, dev, dtype)
            t1 = time.time()
            try:
                kw = t.launch_config(sms)
                one_chunk_attention(p["q"], kv[0], kv[1], p["scale"], backend="triton", **kw)
                print(f"warm D{d} G{g} B{b} {tag(t)} {time.time() - t1:.1f}s", flush=True)
            except Exception as e:  # noqa: BLE001 - the timed run records the error
                print(f"warm D{d} G{g} B{b} {tag(t)} failed: {e!r}"[:300], flush=True)
    if dev == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
