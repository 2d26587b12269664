"""The Gluon one-chunk kernel against the Triton kernel, flash and cuDNN (issue 22 item 4):
`python -m moska.bench.kernels_gluon [--out DIR] [--budget-s S] [--cpu-dry-run] [--warm I/N]`.

One 128K-token chunk read by every KV head of B requests (Hkv 8, bf16), D 64 / 128 x
G 1 / 2 / 4 / 8, B 16-1,024 (`kernels_one_chunk`'s problem). Per point, before any timing,
every call (Gluon variants, the Triton table tile, cuDNN and flash with their LSE through
`sdpa_one_chunk`) is checked against an fp32 reference of the first requests' rows (o and
lse, bf16 rel err < 1e-2); a wrong call is reported and never timed. A second check per
head dim runs each Gluon variant on a chunk of 4,136 keys cut into splits of 1,024 (a
partial last key block, the split merge). Then every call is replayed from a CUDA graph in
rotated rounds (`kernels_one_chunk.timers`). Floors: max(bytes / read bandwidth, FLOPs /
matmul FLOP/s), both measured in this run. The summary gives per point each side's ms, the
best Gluon variant's floor fraction and its ratio to the Triton tile and to the better of
flash and cuDNN (> 1: faster). `--cpu-dry-run` runs the reference and the Triton path in
the interpreter (Gluon cannot run there) and compiles one Gluon variant for sm_90 if the
installed Triton can (recorded, not required).
"""

import argparse
import json
import os
import sys
import time
from functools import partial
from typing import Any

if "--cpu-dry-run" in sys.argv:  # Triton picks its interpreter when it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from moska.bench.bandwidth import check_floors, raise_if_floors_broken
from moska.bench.common import environment, write_json
from moska.bench.floors import attention_flops, kernel_ceilings
from moska.bench.kernels_one_chunk import (
    DRY,
    GPU,
    check,
    problem,
    reference,
    rotated_rounds,
    timers,
)
from moska.bench.kernels_util import rel
from moska.kernels.shared_one_chunk import one_chunk_attention, sdpa_one_chunk
from moska.kernels.shared_tuning import grouped_tuning

# Gluon variants (schedule, block_m, block_n, num_warps, stages, programs_per_sm). Call 1
# (kernels_gluon_h200_session18.json) timed "pipe" (one partition) at every point: slower
# than the Triton kernel everywhere (0.5-0.85x at few rows, 0.7-1.0x at many), so it left
# the list; "ws" (FA3 ping-pong) won at many rows with 3 stages (2 stages: 27 % slower).
# Few rows per KV head (read-bound; Triton's split-KV wins there) keep one variant for the
# record; many rows try the ping-pong with and without the intra-warpgroup overlap ("wso").
FEW = {d: [("wso", 64, 128, 4, 3, 1)] for d in (128, 64)}
MANY = {  # calls 3-5: "k" (K and V freed apart) 0-8 % slower, "e" (exp2 in bf16x2) 6-9 % slower
    # at D 64, 64-key blocks x 6 stages 10-25 % slower: ws and wso stay
    128: [("ws", 64, 128, 4, 3, 1), ("wso", 64, 128, 4, 3, 1)],
    64: [("ws", 64, 128, 4, 3, 1), ("wso", 64, 128, 4, 3, 1)],
}
FEW_ROWS = 512  # rows per KV head below which the FEW variants run


def vtag(v: tuple) -> str:
    return "gluon:{}:m{}n{}w{}s{}p{}".format(*v)


def vkw(t: tuple) -> dict:
    kw = {"schedule": t[0], "block_m": t[1], "block_n": t[2], "num_warps": t[3]}
    return kw | {"stages": t[4], "programs_per_sm": t[5]}


def gluon_calls(p: dict, rows: int, d: int) -> dict:
    from moska.kernels.gluon_one_chunk import gluon_one_chunk

    q, k, v, sc = p["q"], p["k"], p["v"], p["scale"]
    return {
        vtag(t): partial(gluon_one_chunk, q, k, v, sc, **vkw(t))
        for t in (FEW if rows < FEW_ROWS else MANY)[d]
    }


def split_check(d: int, dtype, tol: float) -> dict:
    """Each Gluon variant of head dim d on 4,136 keys in splits of 1,024 (B 5, G 4)."""
    from moska.kernels.gluon_one_chunk import gluon_one_chunk

    hkv, s, b, g = 8, 4136, 5, 4
    k, v = (torch.randn(s, hkv, d, device="cuda", dtype=dtype) for _ in range(2))
    p: dict[str, Any] = {"q": torch.randn(b, hkv * g, d, device="cuda", dtype=dtype)}
    p |= {"k": k, "v": v, "scale": d**-0.5}
    ro, rl = reference(p, b)
    res: dict[str, dict[str, Any]] = {}
    for t in {*FEW[d], *MANY[d]}:
        try:
            kw = vkw(t) | {"programs_per_sm": 64, "min_split": 1024}
            o, lse = gluon_one_chunk(p["q"], k, v, float(p["scale"]), **kw)
            e = {"o": rel(o.view(hkv, b, g, d), ro), "lse": rel(lse.view(hkv, b, g), rl)}
            res[vtag(t)] = e | {"ok": e["o"] < tol and e["lse"] < tol}
        except Exception as ex:  # noqa: BLE001 - reported, the variant is then not timed
            res[vtag(t)] = {"ok": False, "error": repr(ex)[:300]}
    return res


def calls(p: dict, d: int, g: int, b: int, dev: str, sms: int) -> dict:
    q, k, v, sc = p["q"], p["k"], p["v"], p["scale"]
    t = grouped_tuning(d, g, b * g)
    out = {
        "triton": partial(
            one_chunk_attention, q, k, v, sc, backend="triton", **t.launch_config(sms)
        )
    }
    if dev == "cuda":
        out |= {f"sdpa:{n}": partial(sdpa_one_chunk, q, k, v, sc, n) for n in ("cudnn", "flash")}
        out |= gluon_calls(p, b * g, d)
    return out


def run_point(cfg, kv, d, g, b, dev, dtype, sms, prepare, measure, tol, bad, rounds) -> dict:
    p = problem(cfg, kv, d, g, b, dev, dtype)
    pt: dict[str, Any] = {"D": d, "G": g, "B": b, "S": cfg["single_len"], "rows": b * g}
    fns = {k: f for k, f in calls(p, d, g, b, dev, sms).items() if k not in bad}
    pt["check"] = check(p, fns, min(b, cfg["check_reqs"]), tol)
    runs, pt["errors"] = {}, {}
    for name, fn in fns.items():
        if pt["check"][name]["ok"]:
            try:
                runs[name] = prepare(fn)
            except Exception as e:  # noqa: BLE001
                pt["errors"][name] = repr(e)[:300]
    times = rotated_rounds(runs, rounds, measure)
    pt["rounds_ms"], pt["ms"] = times, {k: min(v) for k, v in times.items()}
    el = kv[0].element_size()
    hkv = cfg["hkv"]
    pt["bytes"] = cfg["single_len"] * hkv * d * 2 * el + 2 * b * hkv * g * d * el
    pt["flops"] = attention_flops(b * g * hkv, cfg["single_len"], d)
    return pt


def summary(pt: dict, bw: float, peak: float) -> dict:
    ms = pt["ms"]
    floor = max(pt["bytes"] / bw, pt["flops"] / peak) * 1e3
    out: dict[str, Any] = {
        "floor_ms": round(floor, 4),
        "bound": "read" if pt["bytes"] / bw >= pt["flops"] / peak else "compute",
    }
    gl_ = {k: v for k, v in ms.items() if k.startswith("gluon:")}
    libs = {k: v for k, v in ms.items() if k.startswith("sdpa:")}
    if gl_:
        best = min(gl_, key=lambda n: gl_[n])
        out |= {
            "gluon_best": best,
            "gluon_ms": round(gl_[best], 4),
            "gluon_floor_fraction": round(floor / gl_[best], 3),
        }
    if "triton" in ms:
        out |= {
            "triton_ms": round(ms["triton"], 4),
            "triton_floor_fraction": round(floor / ms["triton"], 3),
        }
    if libs:
        lb = min(libs, key=lambda n: libs[n])
        out |= {"library_best": lb, "library_ms": round(libs[lb], 4)}
    if gl_ and "triton" in ms:
        out["gluon_vs_triton"] = round(ms["triton"] / out["gluon_ms"], 3)
    if gl_ and libs:
        out["gluon_vs_library"] = round(out["library_ms"] / out["gluon_ms"], 3)
    if "triton" in ms and libs:
        out["triton_vs_library"] = round(out["library_ms"] / ms["triton"], 3)
    return out


def _cell(s: dict, key: str, w: int = 8) -> str:
    return f"{s[key]:>{w}}" if key in s else " " * (w - 1) + "-"


COLS: tuple[tuple[str, int], ...] = (
    ("floor_ms", 9),
    ("gluon_ms", 9),
    ("triton_ms", 9),
    ("library_ms", 9),
)
COLS += (("gluon_floor_fraction", 6), ("gluon_vs_triton", 6), ("gluon_vs_library", 6))
COLS += (("triton_vs_library", 6),)


def print_table(summ: dict) -> None:
    head = ("floor", "gluon", "triton", "lib", "g/fl", "g/tri", "g/lib", "t/lib")
    print(
        f"{'point':<16}"
        + "".join(f"{h:>{w}}" for h, (_, w) in zip(head, COLS, strict=True))
        + "  best gluon"
    )
    for k, s in summ.items():
        if isinstance(s, dict) and "floor_ms" in s:
            row = "".join(_cell(s, key, w) for key, w in COLS)
            print(f"{k:<16}{row}  {s.get('gluon_best', '')}")


def jobs(cfg: dict) -> list[tuple[int, int, int]]:
    # many rows first (where cuDNN won), then few
    return [
        (d, g, b)
        for b in sorted(cfg["b_list"], reverse=True)
        for g in cfg["gqa"]
        for d in cfg["dims"]
    ]


def aot_check() -> dict:
    """Compile one Gluon variant for sm_90 with the installed Triton (no GPU needed)."""
    try:
        from moska.bench.kernels_gluon_aot import compile_variant

        return compile_variant(128, 4, 128, 128, 8, 2, False)
    except Exception as e:  # noqa: BLE001 - a Triton without this Gluon API says why
        return {"ok": False, "error": repr(e)[:300]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="kernels_gluon.json")
    ap.add_argument("--budget-s", type=float, default=100, help="start no point after this")
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--warm", default=None, help="I/N: compile units i % N == I, then exit")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rep-ms", type=float, default=10)
    ap.add_argument("--b-list", default=None)
    ap.add_argument("--gqa", default=None)
    ap.add_argument("--dims", default=None)
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("moska.bench.kernels_gluon needs a CUDA GPU (or --cpu-dry-run)")
    t0 = time.time()
    torch.manual_seed(0)
    dev, cfg = ("cpu", dict(DRY)) if dry else ("cuda", dict(GPU))
    for key, arg in (("b_list", args.b_list), ("gqa", args.gqa), ("dims", args.dims)):
        if arg:
            cfg[key] = tuple(int(x) for x in arg.split(","))
    dtype = getattr(torch, cfg["dtype"])
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    sms = 1 if dry else torch.cuda.get_device_properties(dev).multi_processor_count
    pools: dict[int, tuple] = {}

    def pool(d: int) -> tuple:
        if d not in pools:
            shape = (cfg["single_len"], cfg["hkv"], d)
            pools[d] = tuple(torch.randn(shape, device=dev, dtype=dtype) for _ in range(2))
        return pools[d]

    if args.warm:  # compile the Gluon / Triton calls of every i-th point (N processes)
        i, n = (int(x) for x in args.warm.split("/"))
        if not dry and i < len(cfg["dims"]):  # the split check's specializations too
            split_check(cfg["dims"][i], dtype, tol)
        for d, g, b in jobs(cfg)[i::n]:
            p = problem(cfg, pool(d), d, g, b, dev, dtype)
            for name, fn in calls(p, d, g, b, dev, sms).items():
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - the timed run records it
                    print(f"warm D{d} G{g} B{b} {name} failed: {e!r}"[:300], flush=True)
        return
    ceil, bw, peak = kernel_ceilings(dev, dry, 6)
    print(f"read {bw / 1e9:.0f} GB/s, matmul {peak / 1e12:.0f} TFLOP/s, {sms} SMs", flush=True)
    prepare, measure = timers(dev, args.rep_ms)
    res: dict[str, Any] = dict(environment(), device=dev, config=cfg, ceilings=ceil)
    res |= {"read_GBps": bw / 1e9, "matmul_tflops": peak / 1e12, "points": [], "missing": []}
    res["split_check"] = {} if dry else {f"D{d}": split_check(d, dtype, tol) for d in cfg["dims"]}
    if dry:
        res["aot_sm90"] = aot_check()
    bad = {n for c in res["split_check"].values() for n, r in c.items() if not r["ok"]}
    print("split check:", json.dumps(res["split_check"])[:600], flush=True)
    for d, g, b in jobs(cfg):
        if time.time() > t0 + args.budget_s:
            res["missing"].append(f"D{d}_G{g}_B{b}")
            continue
        pt = run_point(
            cfg, pool(d), d, g, b, dev, dtype, sms, prepare, measure, tol, bad, args.rounds
        )
        res["points"].append(pt)
        print(json.dumps({f"D{d}_G{g}_B{b}": summary(pt, bw, peak)}), flush=True)
        if not dry:
            write_json(os.path.join(args.out, args.name), res)
    summ: dict[str, Any] = {"missing": res["missing"], "split_wrong": sorted(bad)}
    summ["wrong"] = [
        f"D{p['D']}_G{p['G']}_B{p['B']} {n}" for p in res["points"]
        for n, c in p["check"].items() if not c["ok"]
    ]  # fmt: skip
    for p in res["points"]:
        summ[f"D{p['D']}_G{p['G']}_B{p['B']}"] = summary(p, bw, peak)
    res["summary"], res["seconds"] = summ, time.time() - t0
    check_floors(res)
    name = "kernels_gluon_cpu_dry_run.json" if dry else args.name
    path = write_json(os.path.join(args.out, name), res)
    print(
        "wrong:",
        summ["wrong"][:8],
        "split_wrong:",
        summ["split_wrong"],
        "missing:",
        summ["missing"][:6],
    )
    print("wrote", path)
    print_table(summ)
    raise_if_floors_broken(res)


if __name__ == "__main__":
    main()
