"""#22.3 / #17.3: can the grouped shared attention and the unique attention share each SM?

The routed decode step at 8B dims (1M shared tokens in 4,096-token chunks, top-8, 4,096
unique tokens a request) is the sum of its parts, not their maximum: the shared attention is
bound by the tensor cores and the softmax (0.62 of its read floor), the paged unique
attention by HBM (0.98), yet launched on two streams they overlap by only a few per cent.
Occupancy says why. Compiled for sm_90, the table's shared tile takes 115,712 bytes of shared
memory and 208 registers a thread (two programs fill an SM's 228 KiB), and the unique
decode tile 69,632 bytes and 255 registers (two programs fill the 64K registers): no SM can
hold both kernels' full share at once, so one waits for the other's programs to retire.

This sweep looks for a pair that fits together: the shared attention capped at one program
per SM (``p1``) or with two stages (``s2``) or 32-key blocks (``n32``), against unique
tiles of fewer warps and keys (fewer registers and shared bytes, more programs an SM). Per
B: each config alone (CUDA graph), every (shared, unique) pair as one step on two streams
(``prio``: shared, after the router if any, on a high-priority stream; unique on the main
one; merge), with and without the two-stage router, the compiled resources of every
variant (registers, shared bytes), and the floors from a read stream and the bf16 matmul
peak measured in the same run. Every variant's output is checked against the default
pair's (they compute the same thing in other tiles).

GPU: ``python -m moska.bench.step_corun --out X.json``;
``--cpu-dry-run``: toy shapes in the Triton interpreter, the same code and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from moska.bench.floors import floor_ms
from moska.bench.kernels_util import rel
from moska.bench.router_overlap import step_cost, step_inputs, step_library, timers
from moska.bench.router_schedules import make_step, make_streams
from moska.bench.router_variants import route_fn, two_stage_options
from moska.kernels.merge import merge_selections
from moska.kernels.paged_attention import _paged_attention_kernel, paged_decode_attention
from moska.kernels.shared_attention import (
    _grouped_shared_attention_kernel,
    grouped_shared_attention,
)

SHARED = ("table", "p1", "s2", "n32", "s2n32")
UNIQUE = ("default", "n64w4", "n32w4", "n64w2", "n32w2", "n32w1")
KEYS = {"p": "max_programs", "s": "num_stages", "n": "block_n", "m": "block_m",
        "w": "num_warps", "x": "num_splits", "h": "half_tail"}  # fmt: skip


def parse_spec(spec: str, sms: int) -> dict:
    """'table' / 'default' -> {}; else letter-number tokens, e.g. 'p1s2' -> max_programs
    1 x SMs, num_stages 2; 'n32w2' -> block_n 32, num_warps 2 (KEYS)."""
    if spec in ("table", "default"):
        return {}
    out, i = {}, 0
    while i < len(spec):
        key, j = spec[i], i + 1
        while j < len(spec) and spec[j].isdigit():
            j += 1
        if key not in KEYS or j == i + 1:
            raise ValueError(f"bad config token in {spec!r} at {spec[i:]!r}")
        n = int(spec[i + 1 : j])
        out[KEYS[key]] = n * sms if key == "p" else bool(n) if key == "h" else n
        i = j
    return out


# Gluon variants (block_m, block_n, stages, overlap, exp_bf16, persistent, warpgroups)
GLUON = {
    "gluon": (64, 128, 3, False, False, False, 2),
    "gluon_ov": (64, 128, 3, True, False, False, 2),
}


def _gluon(q, k, v, offs, scale, var, sms):
    """Shared attention through the Gluon grouped kernel (Hopper, Triton 3.6 only)."""
    from moska.bench.kernels_gluon_grouped import gluon_step
    from moska.kernels.shared_inputs import chunk_table

    def run(sel):
        p = {"q": q, "k": k, "v": v, "sel": sel, "table": chunk_table(offs), "scale": scale}
        return gluon_step(p, var, sms)

    return run


def resources() -> list[dict]:
    """Registers a thread and shared bytes of every compiled variant of the two kernels."""
    out = []
    for name, fn in (
        ("shared", _grouped_shared_attention_kernel),
        ("unique", _paged_attention_kernel),
    ):
        for cache in getattr(fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for k in kernels.values():
                md = k.metadata
                out.append({"kernel": name, "registers": getattr(k, "n_regs", None),
                            "spills": getattr(k, "n_spills", None), "shared_bytes": md.shared,
                            "num_warps": md.num_warps, "num_stages": md.num_stages})  # fmt: skip
    return out


def batch_rows(
    B, lib, shape, ceil, dev, shared_specs, unique_specs, routers, deadline, schedules=("prio",)
) -> dict:
    """One B: configs alone, then every (shared, unique) pair as a step, per router."""
    k, v, offs, index = lib
    D, topk = shape["D"], shape["topk"]
    _, graph = timers(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev == "cuda" else 2
    dt, scale = k.dtype, D**-0.5
    q, (kc, vc, bt, sl) = step_inputs(B, shape, dev, dt)
    routes = {"none": None, **{r: route_fn(r, q, index, topk) for r in routers if r != "none"}}
    fixed = (routes.get("two_stage") or route_fn("two_stage", q, index, topk))()
    shared_cfg = {s: parse_spec(s, sms) for s in shared_specs if s not in GLUON}
    unique_cfg = {u: parse_spec(u, sms) for u in unique_specs}
    shared = {s: (lambda sel, c=c: grouped_shared_attention(q, k, v, offs, sel, scale, **c))
              for s, c in shared_cfg.items()}  # fmt: skip
    for s in shared_specs:  # the Gluon ping-pong kernel (kernels_gluon_grouped's variants)
        if s in GLUON:
            shared[s] = _gluon(q, k, v, offs, scale, GLUON[s], sms)
    unique = {u: (lambda parts=None, c=c: paged_decode_attention(q, kc, vc, bt, sl, scale, **c))
              for u, c in unique_cfg.items()}  # fmt: skip
    row: dict = {"B": B, "alone_ms": {}, "relerr": {}, "step_ms": {}, "floors": {}}
    ref_s, ref_u = shared[shared_specs[0]](fixed), unique[unique_specs[0]]()
    for s, fn in shared.items():
        row["relerr"][f"shared_{s}"] = rel(fn(fixed)[0], ref_s[0])
        row["alone_ms"][f"shared_{s}"] = graph(lambda fn=fn: fn(fixed))
    for u, fn in unique.items():
        row["relerr"][f"unique_{u}"] = rel(fn()[0], ref_u[0])
        row["alone_ms"][f"unique_{u}"] = graph(fn)
    for r, route in routes.items():
        if route is not None:
            row["alone_ms"][f"router_{r}"] = graph(route)
            if dev == "cuda":  # where the router's time goes, kernel by kernel (eager)
                from moska.bench.kernels_util import kernel_breakdown

                row.setdefault("router_kernels_us", {})[r] = kernel_breakdown(route)
    streams, _ = make_streams(dev, schedules)
    base = (shared_specs[0], unique_specs[0])
    pairs = [base] + [(s, u) for s in shared_specs for u in unique_specs if (s, u) != base]
    for r, route in routes.items():
        rt = route if route is not None else (lambda: fixed)
        serial = make_step("serial", rt, shared[base[0]], unique[base[1]], merge_selections, {})
        ref_out = serial()[0]
        row["step_ms"][f"{r}|serial|{base[0]}|{base[1]}"] = graph(serial)
        runs = [(m, s, u) for m in schedules for s, u in pairs + [base]
                if route is not None or m == "prio"]  # fmt: skip
        for m, s, u in runs:  # the base pair again last: the run's drift
            if time.time() > deadline:
                row.setdefault("skipped", []).append(f"{r}|{m}|{s}|{u}")
                continue
            step = make_step(m, rt, shared[s], unique[u], merge_selections, streams)
            key = f"{r}|{m}|{s}|{u}"
            err = rel(step()[0], ref_out)
            row["relerr"][f"step_{key}"] = max(err, row["relerr"].get(f"step_{key}", 0.0))
            t = graph(step)
            row["step_ms"][key] = min(t, row["step_ms"].get(key, float("inf")))
            row["step_ms"].setdefault(f"{key}|runs", []).append(t)
        # floor: the pairs the router touched + unique KV, plus the router's own cost (every
        # router here is the two-stage one, with its grid cap or shortlist: router_variants)
        scorer = None if route is None else "two_stage"
        factor = 4 if route is None else two_stage_options(r).get("f", 4)
        a_bytes, a_flops, r_bytes, r_flops = step_cost(B, q, rt(), index, shape, scorer, factor)
        nbytes, flops = a_bytes + r_bytes, a_flops + r_flops
        f = floor_ms(nbytes, flops, ceil["read_bytes_per_s"], ceil["gemm_flops_per_s"])
        row["floors"][r] = f
    return row


def summarize(rows: list[dict]) -> dict:
    """Per B and router: the default pair's step, the best pair and their floor fractions."""
    out: dict = {}
    for row in rows:
        for r, f in row["floors"].items():
            steps = {k_: v_ for k_, v_ in row["step_ms"].items()
                     if k_.startswith(f"{r}|") and "|serial|" not in k_
                     and not k_.endswith("|runs")}  # fmt: skip
            if not steps:
                continue
            best = min(steps, key=lambda k_: steps[k_])
            base = next(iter(steps))
            tag = f"{r}_b{row['B']}"
            out[f"base_ms_{tag}"] = steps[base]
            out[f"base_fraction_{tag}"] = f["floor_ms"] / steps[base]
            out[f"best_pair_{tag}"] = best.split("|", 1)[1]
            out[f"best_ms_{tag}"] = steps[best]
            out[f"best_fraction_{tag}"] = f["floor_ms"] / steps[best]
            out[f"floor_ms_{tag}"] = f["floor_ms"]
    out["max_relerr"] = max((e for row in rows for e in row["relerr"].values()), default=0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    from moska.bench.common import environment

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1024, 256])
    ap.add_argument("--shared", nargs="+", default=list(SHARED), help="table or tokens p/s/n/m/w")
    ap.add_argument("--unique", nargs="+", default=list(UNIQUE), help="default or tokens n/w/s/x")
    ap.add_argument("--routers", nargs="+", default=["none", "two_stage"])
    ap.add_argument("--schedules", nargs="+", default=["prio"], help="prio, route_first")
    ap.add_argument("--budget-s", type=float, default=150.0, help="pairs after this are skipped")
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy shapes, Triton interpreter")
    ap.add_argument("--out", default="step_corun.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    dry = args.cpu_dry_run or not torch.cuda.is_available()
    dev, dt, shape, ceil, (k, v, offs, index) = step_library(dry, dry_len=64)
    batches = ([b for b in args.batch if b <= 8] or [4]) if dry else args.batch
    rows = []
    for i, B in enumerate(batches):
        deadline = t0 + args.budget_s * (i + 1) / len(batches)
        try:
            row = batch_rows(B, (k, v, offs, index), shape, ceil, dev, args.shared, args.unique,
                             args.routers, deadline, args.schedules)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - recorded; the next B goes on
            row = {"B": B, "error": repr(e)[-600:], "floors": {}, "step_ms": {}, "relerr": {}}
        rows.append(row)
        print(json.dumps({"B": B, "alone_ms": row.get("alone_ms"), "error": row.get("error")}),
              flush=True)  # fmt: skip
        if dev == "cuda":
            torch.cuda.empty_cache()
    summary = summarize(rows)
    bad = [f"{k_}={v_:.3f}" for k_, v_ in summary.items() if "fraction" in k_ and v_ > 1.0]
    res = {**environment(), "command": "python -m moska.bench.step_corun " + " ".join(argv or []),
           "dtype": str(dt), "shapes": shape, "ceilings": ceil, "rows": rows,
           "resources": resources(), "floor_check": bad, "summary": summary,
           "wall_s": time.time() - t0, "notes": __doc__}  # fmt: skip
    res["git_commit"] = os.environ.get("MOSKA_GIT_COMMIT", res.get("git_commit"))
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    print_table(rows)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out} ({res['wall_s']:.0f} s); floor check: {bad or 'ok'}")
    return 1 if bad else 0


def print_table(rows: list[dict]) -> None:
    for row in rows:
        print(f"B = {row['B']}: alone " + ", ".join(
            f"{k_} {v_:.3f}" for k_, v_ in row.get("alone_ms", {}).items()))  # fmt: skip
        for r, f in row["floors"].items():
            print(f"  router {r}: floor {f['floor_ms']:.3f} ms")
            for key, t in sorted(row["step_ms"].items(), key=lambda kv: str(kv[1])):
                if key.startswith(f"{r}|") and not key.endswith("|runs"):
                    print(f"    {key.split('|', 1)[1]:<28} {t:.3f} ms  {f['floor_ms'] / t:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
