"""Issue 16's FP8 target (grouped shared attention >= 1.6x bf16 at B = 1,024) through the Gluon
ping-pong program on FP8 tensor cores (`kernels/gluon_grouped_fp8.py`), against the Triton FP8
program (`fp8_mma`, V token-major, K and V scales per 128-row block: `fp8_mma_vt_block`) and
bf16 (the launcher's table tile) in the same run.

Llama-3.1-8B dims (Hq 32, Hkv 8, D 128), 1M shared tokens in 256 chunks of 4,096, top-8,
uniform routing, B = 1,024 and 256 (`fp8_attention`'s pools and routing). Correctness first:
both FP8 programs against the fp32 reference over the same e4m3 library (o rel err < 5e-2,
lse < 5e-3, the FP8 tolerance of `fp8_attention`) on a sample of requests; a wrong program is
not timed. Times: each call as a CUDA graph (the Gluon one quantizes q per row, plans its
work list and merges its split tiles inside, as the launcher does for the others), the
Gluon program with 3 / 4 / 5 stages and a persistent grid. Floors: every touched chunk's K/V
once over the read bandwidth measured in the run.

GPU only (Gluon does not run in the interpreter): `python -m moska.bench.fp8_gluon --out X.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from moska.bench.bandwidth import measure_ceilings
from moska.bench.common import environment
from moska.bench.fp8_attention import gpu_shape, gsa, make_pools, routing
from moska.bench.kernels_util import bench_graph, rel
from moska.kernels.selections import from_topk
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref
from moska.kernels.shared_inputs import chunk_table
from moska.kernels.shared_split_merge import merge_tile_splits
from moska.kernels.shared_work_list import build_work_list
from moska.library.fp8_mma import MMA_TILE

TOL_O, TOL_LSE = 5e-2, 5e-3
# (stages, persistent)
GLUON = {"gluon_s3": (3, False), "gluon_s4": (4, False), "gluon_s5": (5, False)}
GLUON["gluon_s4_persistent"] = (4, True)


def gluon_call(q, k8, v8_t, scales, offs, sel, scale, stages, persistent, sms):
    """One grouped step through the Gluon FP8 program: plan (128-row tiles), run, merge."""
    from moska.kernels.gluon_grouped_fp8 import gluon_grouped_fp8_attention

    table = chunk_table(offs)
    hkv, g = k8.shape[1], q.shape[1] // k8.shape[1]
    plan = build_work_list(sel, table, hkv, g, 128, 128, sms, 512)
    o, lse, o_part, lse_part = gluon_grouped_fp8_attention(
        q, k8, v8_t, scales[0], scales[1], table.starts, table.ends, sel, plan, scale,
        stages=stages, programs=sms if persistent else None,
    )  # fmt: skip
    merge_tile_splits(plan[0], plan[1], o_part, lse_part, o, lse, g, 128, 4, 32)
    return o, lse


def batch_row(b, s, pools, gen, sms, sample, bw) -> dict:
    k, v, offs, q8 = pools
    kq, vq = q8["block"]
    v_t = q8["v_t_block"]
    scales = (kq.scale, vq.scale)
    scale = s.d**-0.5
    mma: dict[str, Any] = {
        "kv_scales": scales,
        "fp8_mma": True,
        "v_pool_t": v_t,
        "fp8_scale_block": 128,
    }
    mma["use_tma"] = True  # V token-major is read through TMA (fp8_attention's vt_block)
    q = torch.randn(b, s.hq, s.d, device=s.device).to(s.dtype)
    chunks_of = routing(b, s, "uniform", gen)
    fns: dict[str, Callable] = {
        "bf16": lambda q_, sel_: grouped_shared_attention(q_, k, v, offs, sel_, scale),
        "triton_fp8": lambda q_, sel_: gsa(q_, kq.data, vq.data, offs, sel_, scale, **mma),
        # the engine's FP8 tile (library/fp8_mma.MMA_TILE), as fp8_reach times it
        "triton_fp8_m64n128": lambda q_, sel_: gsa(
            q_, kq.data, vq.data, offs, sel_, scale, **mma, **MMA_TILE
        ),
    }
    for name, (st, pers) in GLUON.items():
        fns[name] = lambda q_, sel_, st=st, pers=pers: gluon_call(
            q_, kq.data, v_t, scales, offs, sel_, scale, st, pers, sms
        )
    row: dict = {"batch": b}
    check_and_time(row, fns, q, chunks_of, s, (kq, vq), k, v, offs, sample)
    read_floors(row, chunks_of, s, bw)
    base = row["ms"].get("bf16")
    if base:
        row["speedup_vs_bf16"] = {n: base / t for n, t in row["ms"].items()}
    return row


def read_floors(row: dict, chunks_of, s, bw: float) -> None:
    """Every touched chunk's K and V read once over the read bandwidth `bw`, as e4m3 with
    its block scales and as bf16: row's fp8_read_floor_ms / bf16_read_floor_ms."""
    touched = int(torch.unique(chunks_of).numel()) * s.hkv
    fp8_bytes = touched * s.chunk * s.d * 2 + 2 * touched * s.chunk * 4 // 128  # K, V, scales
    row["fp8_read_floor_ms"] = fp8_bytes / bw * 1e3
    row["bf16_read_floor_ms"] = touched * s.chunk * s.d * 2 * 2 / bw * 1e3


def check_and_time(row, fns, q, chunks_of, s, q8, k, v, offs, sample) -> None:
    """Each of `fns` (name -> fn(q, sel) -> (o, lse)) checked on `sample` requests against the
    fp32 reference (bf16 over the bf16 library, the others over the e4m3 one `q8` = (kq, vq)),
    then the correct ones timed as CUDA graphs on the whole batch: row's check / ms / errors."""
    kq, vq = q8
    scales, scale = (kq.scale, vq.scale), s.d**-0.5
    qs = q[:sample].contiguous()
    sel_s = from_topk(chunks_of[:sample].view(sample, 1, -1), s.hkv, s.chunks)
    ro, rl = grouped_shared_attention_ref(qs, kq.data, vq.data, offs, sel_s, scale,
                                          kv_scales=scales)  # fmt: skip
    rb, _ = grouped_shared_attention_ref(qs, k, v, offs, sel_s, scale)
    row.update(check={"e4m3_values_vs_bf16_values": rel(ro, rb)}, ms={}, errors={})
    ok = {}
    for name, fn in fns.items():
        try:
            o, lse = fn(qs, sel_s)
        except Exception as e:  # noqa: BLE001 - recorded; the others go on
            row["errors"][name] = f"{type(e).__name__}: {e}"[:600]
            continue
        bf16 = name.startswith("bf16")
        ref_o, ref_l = (rb, None) if bf16 else (ro, rl)
        err_o = rel(o, ref_o)
        err_l = rel(lse, ref_l) if ref_l is not None else 0.0
        good = err_o < (1e-2 if bf16 else TOL_O) and err_l < TOL_LSE
        row["check"][name] = {"o_rel_err": err_o, "lse_rel_err": err_l, "ok": good}
        ok[name] = good
    sel = from_topk(chunks_of.view(q.shape[0], 1, -1), s.hkv, s.chunks)
    for name, fn in fns.items():
        if not ok.get(name):
            continue
        try:
            row["ms"][name] = bench_graph(lambda fn=fn: fn(q, sel))
        except Exception as e:  # noqa: BLE001 - recorded
            row["errors"][f"{name}_time"] = f"{type(e).__name__}: {e}"[:600]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1024, 256])
    ap.add_argument("--sample", type=int, default=8)
    ap.add_argument("--out", default="fp8_gluon.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    s = gpu_shape(256, 8)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ceil = measure_ceilings("cuda", gib=4.0, reps=10, gemm=False)
    sms = torch.cuda.get_device_properties("cuda").multi_processor_count
    pools = make_pools(s)
    rows = [batch_row(b, s, pools, gen, sms, args.sample, ceil["read_bytes_per_s"])
            for b in args.batch]  # fmt: skip
    summary: dict = {"target": "FP8 >= 1.6x bf16 tokens/s at B = 1,024"}
    for r in rows:
        sp = r.get("speedup_vs_bf16", {})
        gl_ = {n: x for n, x in sp.items() if n.startswith("gluon")}
        tag = f"b{r['batch']}"
        tri = {n: x for n, x in sp.items() if n.startswith("triton")}
        if tri:  # the better Triton tile (the launcher's default or the engine's)
            summary[f"triton_fp8_best_{tag}"] = max(tri, key=lambda n: tri[n])
            summary[f"triton_fp8_speedup_{tag}"] = max(tri.values())
        if gl_:
            best = max(gl_, key=lambda n: gl_[n])
            summary[f"gluon_best_{tag}"] = best
            summary[f"gluon_speedup_{tag}"] = gl_[best]
            summary[f"gluon_fp8_read_floor_fraction_{tag}"] = r["fp8_read_floor_ms"] / r["ms"][best]
        summary[f"all_checked_ok_{tag}"] = all(c["ok"] for k_, c in r["check"].items()
                                                if isinstance(c, dict))  # fmt: skip
    res = {**environment(), "command": "python -m moska.bench.fp8_gluon " + " ".join(argv or []),
           "shape": s.__dict__ | {"dtype": str(s.dtype)}, "ceilings": ceil, "rows": rows,
           "summary": summary, "wall_s": time.time() - t0, "notes": __doc__}  # fmt: skip
    res["git_commit"] = os.environ.get("MOSKA_GIT_COMMIT", res.get("git_commit"))
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    for r in rows:
        print(f"B = {r['batch']}: check {json.dumps(r['check'])}")
        print(f"  ms {json.dumps({n: round(t, 3) for n, t in r['ms'].items()})}")
        print(
            f"  speedup vs bf16 {json.dumps({n: round(x, 3) for n, x in r.get('speedup_vs_bf16', {}).items()})}"
        )
        if r["errors"]:
            print(f"  errors {json.dumps(r['errors'])[:1500]}")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
