"""Tile and kernel variants of the grouped shared kernel per model shape, in one device run:
`python -m moska.bench.kernels_shapes_variants [--out DIR] [--budget-s S] [--cpu-dry-run]
[--warm I/N]` (issue 22, items 3-4).

Shapes: head dim D in 64, 128 x GQA ratio G in 1, 4, 8 (Hkv 8, bf16). Two cases per shape:

- grouped: 1M shared tokens in 256 chunks of 4,096, top-8 chunks per request, uniform and
  Zipf routing, B = 64 and 1,024 (the kernel alone, replayed as a CUDA graph);
- single: one 128K-token chunk read by B = 16, 64, 256, 1,024 requests, against torch SDPA
  flash and cuDNN on the same packed rows ([1, Hkv, B * G, D]), with K/V as strided views of
  the pool (what the pool holds) and as contiguous copies made outside the timing (the
  layout they prefer): the best of the four is the baseline.

Every variant (GROUPED / SINGLE: the table's tile, today's tiles, and 128-row tiles with
`half_tail`, which computes a group's last tile of <= 64 rows at half height) is first
checked in bf16 against the plain-PyTorch reference on a sample of selections (rel err <
1e-2; a failing variant is reported and never "best"), then timed. Floors: max(bytes / read
bandwidth, FLOPs / matmul FLOP/s), both measured in this run (moska/bench/floors.py); the
summary gives each point's table and best variant with its floor fraction and its fraction
of the read floor alone (the issue's target: >= 0.75 at B = 1,024; `read_target_reachable`
says whether the FLOPs allow it at the measured matmul peak).

`--warm I/N` compiles (runs once, untimed, at toy chunk lengths with the same launch
arguments) the jobs with index % N == I and exits: N such processes in parallel fill the
Triton cache before the timed run (bench/device_session14_shapes.sh).
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

if "--cpu-dry-run" in sys.argv:  # Triton picks its interpreter when it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moska.bench.bandwidth import check_floors, raise_if_floors_broken
from moska.bench.common import environment, write_json
from moska.bench.floors import (
    attention_flops,
    floor_ms,
    grouped_shared_cost,
    kernel_ceilings,
)
from moska.bench.kernels_shapes import as_python, rel, selections, subset
from moska.bench.kernels_shapes import timer as make_timer
from moska.bench.kernels_shapes_report import l2_reads, print_summary, suggested_table, summary
from moska.bench.kernels_shapes_tiles import variants
from moska.kernels.selections import Selections
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref
from moska.kernels.shared_tuning import GroupedTuning

GPU: dict[str, Any] = {"hkv": 8, "chunks": 256, "chunk_len": 4096, "topk": 8, "dtype": "bfloat16"}
GPU |= {"dims": (128, 64), "gqa": (4, 8, 1), "b_grouped": (64, 1024), "single_len": 131072}
GPU |= {"b_single": (16, 64, 256, 1024), "routings": ("uniform", "zipf")}
DRY: dict[str, Any] = {"hkv": 2, "chunks": 6, "chunk_len": 64, "topk": 2, "dtype": "float32"}
DRY |= {"dims": (64,), "gqa": (1, 4), "b_grouped": (6,), "single_len": 96, "b_single": (4,)}
DRY |= {"routings": ("uniform",)}
WARM_CHUNK_LEN, WARM_SINGLE_LEN = 64, 256  # same launch arguments, toy key counts


def jobs(cfg: dict) -> list[tuple[str, int, int, int]]:
    """(case, D, G, B) of the run, in order."""
    out = []
    for d in cfg["dims"]:
        out += [("grouped", d, g, b) for g in cfg["gqa"] for b in cfg["b_grouped"]]
        out += [("single", d, g, b) for g in cfg["gqa"] for b in cfg["b_single"]]
    return out


def single_problem(b: int, g: int, d: int, s: int, cfg: dict, dev: str, dtype) -> dict:
    """One chunk of s keys read by every KV head of b requests."""
    hkv = cfg["hkv"]
    k, v = (torch.randn(s, hkv, d, device=dev, dtype=dtype) for _ in range(2))
    kv = torch.arange(hkv, device=dev, dtype=torch.int32).repeat_interleave(b)
    req = torch.arange(b, device=dev, dtype=torch.int32).repeat(hkv)
    sel = Selections(req, kv, torch.zeros_like(req))
    offs = torch.tensor([0, s], dtype=torch.int32, device=dev)
    q = torch.randn(b, hkv * g, d, device=dev, dtype=dtype)
    return {"q": q, "k": k, "v": v, "offs": offs, "sel": sel}


def run_variant(p: dict, t: GroupedTuning, sms: int):
    kw = t.launch_config(sms)
    return grouped_shared_attention(p["q"], p["k"], p["v"], p["offs"], p["sel"], p["scale"], **kw)


def point(p: dict, vs: dict, sms: int, measure, deadline: float, tol: float) -> dict:
    """Correctness of every variant on a sample of selections against the reference, then
    the times of the correct ones (ms)."""
    sel, n = p["sel"], p["sel"].req.numel()
    idx = torch.randperm(n, device=p["q"].device)[: min(n, 32)].sort().values
    ro, _ = grouped_shared_attention_ref(
        p["q"], p["k"], p["v"], p["offs"], subset(sel, idx), p["scale"]
    )
    out: dict[str, Any] = {"relerr_vs_ref": {}, "ms": {}, "errors": {}}
    for name, t in vs.items():
        if time.time() > deadline:
            out["errors"][name] = "skipped: past the time budget"
            continue
        try:
            o, _ = run_variant(p, t, sms)
            err = out["relerr_vs_ref"][name] = rel(o[idx], ro)
            if not err < tol:
                out["errors"][name] = f"wrong: rel err {err:.3g} vs the reference"
                continue
            out["ms"][name] = measure(lambda t=t: run_variant(p, t, sms))
        except Exception as e:  # noqa: BLE001 - a variant that fails to compile drops out
            out["errors"][name] = repr(e)[:300]
    return out


def sdpa_baselines(p: dict, g: int, measure, dev: str) -> dict:
    """flash / cuDNN on the packed rows, K/V strided (pool views) and contiguous; timed
    eagerly on the GPU (one launch a call, queued ahead of the GPU: no host gaps, and no
    CUDA-graph capture of a library kernel that might refuse it)."""
    if dev == "cuda":
        from triton.testing import do_bench

        def measure(fn) -> float:
            return do_bench(fn, warmup=10, rep=40, return_mode="median")

    q, k, v, scale = p["q"], p["k"], p["v"], p["scale"]
    b, _, d = q.shape
    hkv = k.shape[1]
    qp = q.view(b, hkv, g, d).transpose(0, 1).reshape(1, hkv, b * g, d)
    views = {"": (k.unsqueeze(0).transpose(1, 2), v.unsqueeze(0).transpose(1, 2))}
    views["_contig"] = tuple(t.contiguous() for t in views[""])
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    if dev == "cpu":
        backends = {"math": SDPBackend.MATH}
    out: dict[str, Any] = {"ms": {}, "errors": {}, "relerr_vs_ref": {}}
    ref = p.get("ref_rows")  # [hkv, rows, d] of requests 0..r-1
    for bname, be in backends.items():
        for suffix, (kt, vt) in views.items():
            name = bname + suffix

            def call(kt=kt, vt=vt, be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(qp, kt, vt, scale=scale)

            try:
                o = call()
                if ref is not None:
                    out["relerr_vs_ref"][name] = rel(o[0, :, : ref.shape[1]], ref)
                out["ms"][name] = measure(call)
            except Exception as e:  # noqa: BLE001 - a backend refusing the shape says why
                out["errors"][name] = repr(e)[:300]
    return out


def single_ref_rows(p: dict, g: int, r: int) -> torch.Tensor:
    """fp32 reference of the first r requests' rows, laid out like the packed SDPA rows."""
    q, k, v = p["q"][:r].float(), p["k"].float(), p["v"].float()
    hkv, d = k.shape[1], q.shape[-1]
    qh = q.view(r, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, r * g, d)
    s = torch.einsum("hmd,shd->hms", qh, k) * p["scale"]
    return torch.einsum("hms,shd->hmd", s.softmax(-1), v)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results", help="output directory")
    ap.add_argument("--name", default="kernels_shapes_variants.json", help="output file name")
    ap.add_argument("--budget-s", type=float, default=150, help="time no variant after this")
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy sizes, interpreter, CPU")
    ap.add_argument("--warm", default=None, help="I/N: compile the jobs i % N == I, then exit")
    ap.add_argument("--high-g", action="store_true", help="grouped G 4 / 8 at B 1,024 only")
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("moska.bench.kernels_shapes_variants needs a CUDA GPU (or --cpu-dry-run)")
    t0 = time.time()
    deadline = t0 + args.budget_s
    torch.manual_seed(0)
    dev, cfg = ("cpu", dict(DRY)) if dry else ("cuda", dict(GPU))
    if args.high_g:  # the grouped kernel where it is furthest from its floor (session 15)
        cfg |= {"high_g": True, "b_single": (), "gqa": (4, 8) if not dry else cfg["gqa"]}
        cfg["b_grouped"] = (1024,) if not dry else cfg["b_grouped"]
    dtype = getattr(torch, cfg["dtype"])
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    sms = 1 if dry else torch.cuda.get_device_properties(dev).multi_processor_count
    all_jobs = jobs(cfg)
    if args.warm:
        i, n = map(int, args.warm.split("/"))
        warm(cfg, i, n, dev, dtype, sms, dry)
        return
    ceil, bw, peak = kernel_ceilings(dev, dry, 8)
    print(f"read {bw / 1e9:.0f} GB/s, matmul {peak / 1e12:.0f} TFLOP/s, {sms} SMs", flush=True)
    measure = make_timer(dev)
    res: dict[str, Any] = dict(environment(), device=dev, config=cfg, ceilings=ceil)
    res |= {"read_GBps": bw / 1e9, "matmul_tflops": peak / 1e12, "points": []}
    pools: dict[int, tuple] = {}
    for case, d, g, b in all_jobs:
        if time.time() > deadline:
            res["points"].append({"case": case, "D": d, "G": g, "B": b, "missing": "budget"})
            continue
        if case == "grouped":
            if d not in pools:
                pools.clear()
                torch.cuda.empty_cache() if dev == "cuda" else None
                pools[d] = grouped_pool(cfg, cfg["chunk_len"], d, dev, dtype)
            res["points"] += grouped_points(cfg, pools[d], d, g, b, dev, sms, measure, deadline)
            for pt in res["points"][-len(cfg["routings"]) :]:
                pt.update(floor_ms(pt["bytes"], pt["flops"], bw, peak))
        else:
            pools.clear()
            p = single_problem(b, g, d, cfg["single_len"], cfg, dev, dtype)
            p["scale"] = d**-0.5
            p["ref_rows"] = single_ref_rows(p, g, min(b, 4))
            rows = b * g
            pt = {"case": case, "D": d, "G": g, "B": b, "S": cfg["single_len"], "rows": rows}
            pt |= point(p, variants(case, d, g, rows, dry), sms, measure, deadline, tol)
            pt["baselines"] = sdpa_baselines(p, g, measure, dev)
            hkv, el = cfg["hkv"], p["k"].element_size()
            pt["bytes"] = cfg["single_len"] * hkv * d * 2 * el + 2 * b * hkv * g * d * el
            pt["flops"] = attention_flops(rows * hkv, cfg["single_len"], d)
            pt.update(floor_ms(pt["bytes"], pt["flops"], bw, peak))
            res["points"].append(pt)
            del p
        print(json.dumps(brief(res["points"][-1])), flush=True)
        if not dry:  # a run cut short by its timeout still leaves every finished point
            write_json(os.path.join(args.out, args.name), res)
    res["summary"] = summary(res["points"])
    res["table"] = suggested_table(res["points"])
    res["seconds"] = time.time() - t0
    check_floors(res)
    name = "kernels_shapes_variants_cpu_dry_run.json" if dry else args.name
    path = write_json(os.path.join(args.out, name), res)
    print_summary(res["summary"])
    print("TABLE entries (moska/kernels/shared_tuning.py):\n" + as_python(res["table"]))
    print("wrote", path)
    raise_if_floors_broken(res)


def grouped_pool(cfg: dict, chunk_len: int, d: int, dev: str, dtype) -> tuple:
    s = cfg["chunks"] * chunk_len
    k = torch.randn(s, cfg["hkv"], d, device=dev, dtype=dtype)
    offs = torch.arange(0, s + 1, chunk_len, dtype=torch.int32, device=dev)
    return k, torch.randn_like(k), offs


def grouped_points(cfg, pool, d, g, b, dev, sms, measure, deadline) -> list[dict]:
    k, v, offs = pool
    hkv, out = cfg["hkv"], []
    for routing in cfg["routings"]:
        sel = selections(b, cfg, routing, dev)
        q = torch.randn(b, hkv * g, d, device=dev, dtype=k.dtype)
        p = {"q": q, "k": k, "v": v, "offs": offs, "sel": sel, "scale": d**-0.5}
        n = sel.req.numel()
        rows = n * g / max(1, min(n, cfg["chunks"] * hkv))
        tol = 1e-4 if k.dtype == torch.float32 else 1e-2
        pt = {"case": "grouped", "D": d, "G": g, "B": b, "routing": routing, "rows": rows}
        vs = variants("grouped", d, g, rows, dev == "cpu", cfg.get("high_g", False))
        pt |= point(p, vs, sms, measure, deadline, tol)
        touched = int(torch.unique(sel.chunk).numel())
        pt["touched_chunks"] = touched
        pt["bytes"], pt["flops"] = grouped_shared_cost(
            n, g, touched, cfg["chunk_len"], hkv, d, b, k.element_size()
        )
        pt["tunings"] = {n_: dataclasses.asdict(t) for n_, t in vs.items()}
        counts = torch.bincount((sel.chunk * hkv + sel.kv_head).long())
        chunk_bytes = cfg["chunk_len"] * d * 2 * k.element_size()  # K and V of one KV head
        pt["l2"] = l2_reads(counts[counts > 0] * g, pt["tunings"], chunk_bytes, pt["ms"])
        out.append(pt)
    return out


def warm(cfg: dict, i: int, n: int, dev: str, dtype, sms: int, dry: bool) -> None:
    """Run the variants of units i, i + n, ... once at toy key counts (compiles; nothing
    timed). A unit is one tile of one (D, G) at every case and B that times it: they share
    its kernel, so each kernel is compiled by one process and the units spread evenly."""
    units: dict[tuple, list] = {}
    for case, d, g, b in jobs(cfg):
        if case == "grouped":
            nsel = b * cfg["topk"] * cfg["hkv"]
            rows = nsel * g / max(1, min(nsel, cfg["chunks"] * cfg["hkv"]))
        else:
            rows = b * g
        for name, t in variants(case, d, g, rows, dry, cfg.get("high_g", False)).items():
            units.setdefault((d, g, t), []).append((case, b, name))
    pools: dict[int, tuple] = {}
    for (d, g, t), runs in list(units.items())[i::n]:
        for case, b, name in runs:
            if case == "grouped":
                pool = pools.setdefault(d, grouped_pool(cfg, WARM_CHUNK_LEN, d, dev, dtype))
                sel = selections(b, cfg, "uniform", dev)
                q = torch.randn(b, cfg["hkv"] * g, d, device=dev, dtype=dtype)
                p = {"q": q, "k": pool[0], "v": pool[1], "offs": pool[2], "sel": sel}
            else:
                p = single_problem(b, g, d, WARM_SINGLE_LEN, cfg, dev, dtype)
            p["scale"] = d**-0.5
            t1 = time.time()
            try:
                run_variant(p, t, sms)
                print(f"warm {case} D{d} G{g} B{b} {name} {time.time() - t1:.1f}s", flush=True)
            except Exception as e:  # noqa: BLE001 - the timed run records the error
                print(f"warm {case} D{d} G{g} B{b} {name} failed: {e!r}"[:300], flush=True)
    if dev == "cuda":
        torch.cuda.synchronize()


def brief(pt: dict) -> dict:
    keep = ("case", "D", "G", "B", "routing", "floor_ms", "bound", "missing")
    out = {k: pt[k] for k in keep if k in pt}
    out["ms"] = {k: round(v, 4) for k, v in pt.get("ms", {}).items()}
    if "baselines" in pt:
        out["baselines_ms"] = {k: round(v, 4) for k, v in pt["baselines"]["ms"].items()}
    out["errors"] = {k: v[:80] for k, v in pt.get("errors", {}).items()}
    return out


if __name__ == "__main__":
    main()
