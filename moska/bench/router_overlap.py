"""#17.3 / #22.5: the routed decode-attention step against its floor, with the router's cost
taken apart, and the ways to hide it that keep every choice.

One layer at 8B dims (32 query heads, 8 KV heads, head dim 128), 1M shared tokens in 256
chunks of 4,096, top-8, 4,096 unique tokens per request (paged), bf16; the step is the
kernels bench's (`kernels_grouped.grouped_row`): route -> grouped shared attention, paged
unique attention, merge. Per B and router (``default``: key-max over every key per KV head,
the policy every entry point uses; ``two_stage``: the bound shortlist then key-max):

- each part alone (CUDA graph): router, shared (on the router's selections), unique, merge;
- the step in each stream schedule, eager and as one CUDA graph (``SCHEDULES``); every
  schedule runs the same launches on the same inputs, so its choices are the router's;
- ``gemm``: the default's scores as cuBLAS GEMMs (torch.matmul of the projected queries
  against a block of chunks' low-rank keys, then amax over keys and the group), the
  "one large tensor-core GEMM" form, timed beside the fused kernel, with its choices;
- the floor (bytes over a read-only stream, FLOPs over the best bf16 matmul, both measured
  in this run; router bytes and FLOPs counted as `floors.router_cost`), each fraction, and
  the critical path the dependencies allow: router -> shared -> merge cannot overlap
  (the shared attention reads the router's chunks), so no schedule beats
  ``router + shared + merge`` (each alone) nor ``unique + merge``; ``reachable_fraction``
  = floor / the larger of those.

Correctness on fresh random inputs: each router's chosen chunks against the fp32 reference
scores (rows whose k-th and (k+1)-th reference scores are clear of fp16 rounding must pick
the same set), the GEMM form's likewise, and every schedule's output against serial.
``--cpu-dry-run``: toy shapes in the Triton interpreter, the same code and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from moska.bench.floors import attention_flops, floor_ms, router_cost
from moska.bench.router_schedules import SCHEDULES, make_step, make_streams
from moska.bench.router_variants import route_fn
from moska.kernels import router
from moska.kernels.merge import merge_selections
from moska.kernels.paged_attention import paged_decode_attention
from moska.kernels.router_dense import project_queries
from moska.kernels.router_topk import topk_rows
from moska.kernels.shared_attention import grouped_shared_attention


def gemm_scores(q, index, block_chunks: int, chunk_len: int) -> torch.Tensor:
    """The default's key-max scores [B, Hkv, C] as torch.matmul + amax: per KV head and block
    of chunks, [B*G, r] x [r, block*L] on the tensor cores (cuBLAS), then the max over the
    block's keys and the G query heads. Chunks of ``chunk_len`` keys each (the bench's
    library; passed in, not read from the offsets: no host sync, so it can be a graph)."""
    B, Hq, _ = q.shape
    Hkv, C, R = index.num_kv_heads, index.num_chunks, index.rank
    G, L = Hq // Hkv, chunk_len
    lk = index.lowrank_keys  # [S, Hkv, R]
    qp = project_queries(q, index.basis, lk.dtype).view(B, Hkv, G, R)
    out = torch.empty(B, Hkv, C, dtype=torch.float32, device=q.device)
    for h in range(Hkv):
        qh = qp[:, h].reshape(B * G, R)
        for c0 in range(0, C, block_chunks):
            c1 = min(C, c0 + block_chunks)
            logits = qh @ lk[c0 * L : c1 * L, h].t()  # [B*G, n*L]
            out[:, h, c0:c1] = logits.view(B, G, c1 - c0, L).amax(dim=(1, 3)).float()
    return out


def chosen_sets(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """[B, Hkv, C] scores -> [B, Hkv, C] bool: the top-k chunks of each (request, head)."""
    idx = topk_rows(scores, topk, scores.is_cuda)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx.long(), True)


def sel_sets(sel, B: int, Hkv: int, C: int) -> torch.Tensor:
    out = torch.zeros(B, Hkv, C, dtype=torch.bool, device=sel.req.device)
    out[sel.req.long(), sel.kv_head.long(), sel.chunk.long()] = True
    return out


def choice_check(got: torch.Tensor, ref_scores: torch.Tensor, topk: int, tol: float) -> dict:
    """Rows whose reference gap between the k-th and (k+1)-th score exceeds ``tol`` (clear of
    fp16 rounding) must choose the reference's set; all rows are reported too."""
    top = ref_scores.topk(topk + 1, dim=-1).values
    clear = (top[..., topk - 1] - top[..., topk]) > tol * top[..., 0].abs().clamp_min(1.0)
    same = (got == chosen_sets(ref_scores, topk)).all(-1)
    return {"rows": int(same.numel()), "rows_clear": int(clear.sum()),
            "clear_rows_equal": int((same & clear).sum()), "all_rows_equal": int(same.sum()),
            "ok": bool((same | ~clear).all())}  # fmt: skip


def step_library(dry: bool, dry_len: int = 32):
    """The routed step's setting, shared by router_overlap and step_corun: (device, dtype,
    shape, ceilings measured now, (k, v, offsets, routing index)); 8B dims, 1M shared
    tokens in 4,096-token chunks, top-8, 4,096 unique tokens, or toy shapes (`dry`, chunks
    and unique contexts of `dry_len`) on CPU."""
    from moska.bench.kernels_util import ceilings

    dev, dt = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    if dry:
        n = dry_len
        shape = {"Hq": 4, "Hkv": 2, "D": 16, "C": 8, "L": n, "U": n, "topk": 2, "bs": 16}
    else:
        shape = {"Hq": 32, "Hkv": 8, "D": 128, "C": 256, "L": 4096, "U": 4096, "topk": 8, "bs": 16}
    _, _, ceil = ceilings(dev)
    S = shape["C"] * shape["L"]
    k = torch.randn(S, shape["Hkv"], shape["D"], device=dev, dtype=dt)
    v = torch.randn_like(k)
    offs = torch.arange(0, S + 1, shape["L"], dtype=torch.int32, device=dev)
    index = router.build_routing_index(k, offs, rank=shape["D"] // 4)
    return dev, dt, shape, ceil, (k, v, offs, index)


def step_inputs(B: int, shape: dict, dev: str, dt: torch.dtype):
    """Fresh random queries [B, Hq, D] and a paged unique cache of U tokens a request:
    (q, (k_cache, v_cache, block_tables, seq_lens))."""
    Hq, Hkv, D, U, bs = (shape[n] for n in ("Hq", "Hkv", "D", "U", "bs"))
    q = torch.randn(B, Hq, D, device=dev, dtype=dt)
    kc = torch.randn(B * U // bs, bs, Hkv, D, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    bt = torch.arange(B * U // bs, dtype=torch.int32, device=dev).view(B, U // bs)
    sl = torch.full((B,), U, dtype=torch.int32, device=dev)
    return q, (kc, vc, bt, sl)


def step_cost(B, q, sel, index, shape: dict, scorer: str | None, factor: int = 4):
    """(attention bytes, attention FLOPs, router bytes, router FLOPs) of one routed step on
    the selections `sel`: K and V of the (chunk, KV head) pairs read plus the unique KV,
    and the router's own reads and FLOPs (`floors.router_cost`; two_stage: the low-rank
    keys of the chunks some request shortlisted, `factor` x top-k each); `scorer` None: no
    router (0, 0)."""
    Hq, Hkv, D, C, L, U, topk = (shape[n] for n in ("Hq", "Hkv", "D", "C", "L", "U", "topk"))
    pairs = int(torch.unique(sel.chunk.long() * Hkv + sel.kv_head.long()).numel())
    nbytes = (pairs * L + B * U * Hkv) * D * 2 * 2
    flops = attention_flops(B * Hq, topk * L + U, D)
    if scorer is None:
        return nbytes, flops, 0, 0
    short = 0
    if scorer == "two_stage":
        b_ = router.score_chunks(q, index, "bound").sum(1).topk(min(C, factor * topk), -1)
        short = int(torch.unique(b_.indices).numel())
    r_bytes, r_flops = router_cost(scorer, B, Hq, Hkv, D, C, L, index.rank, short,
                                   factor * topk, lowrank_bytes=index.lowrank_keys.element_size())  # fmt: skip
    return nbytes, flops, r_bytes, r_flops


def timers(dev: str):
    """(eager ms, graph ms) timers: do_bench medians on the GPU, one host-clock run on CPU."""
    from moska.bench.common import time_ms

    if dev != "cuda":
        t = lambda fn: time_ms(fn, iters=1, warmup=0)
        return t, t
    from moska.bench.kernels_util import bench, bench_graph

    return bench, bench_graph


def batch_row(B, name, lib, shape, ceil, dev, schedules, gemm_block) -> dict:
    """One (B, router) row: the parts alone, the step per schedule, choices, floors."""
    k, v, offs, index = lib
    Hkv, D, C, L, topk = (shape[n] for n in ("Hkv", "D", "C", "L", "topk"))
    eager, graph = timers(dev)
    dt, scale = k.dtype, D**-0.5
    q, (kc, vc, bt, sl) = step_inputs(B, shape, dev, dt)
    route = route_fn(name, q, index, topk)

    def shared(sel):
        return grouped_shared_attention(q, k, v, offs, sel, scale)

    def unique(parts):
        if not parts:
            return paged_decode_attention(q, kc, vc, bt, sl, scale)
        h = B // parts
        outs = [paged_decode_attention(q[i:i + h], kc, vc, bt[i:i + h], sl[i:i + h], scale)
                for i in range(0, B, h)]  # fmt: skip
        return torch.cat([o for o, _ in outs]), torch.cat([lse for _, lse in outs])

    sel = route()
    o_s, l_s = shared(sel)
    o_u, l_u = unique(None)
    row: dict = {"B": B, "router": name}
    # choices on these fresh random inputs against the fp32 reference scores
    ref = router.score_chunks(q, index, "keymax", use_triton=False)  # [B, Hkv, C] fp32
    got = sel_sets(sel, B, Hkv, C)
    if name == "two_stage":  # per request: key-max summed over heads on the bound shortlist
        sl_ = router.score_chunks(q, index, "bound").sum(1).topk(min(C, 4 * topk), -1).indices
        keep = torch.zeros(B, C, dtype=torch.bool, device=dev).scatter_(1, sl_, True)
        ref_r = ref.sum(1, keepdim=True).masked_fill(~keep[:, None], float("-inf"))
        row["choices_vs_fp32_reference"] = choice_check(got[:, :1], ref_r, topk, 2e-3)
    else:
        row["choices_vs_fp32_reference"] = choice_check(got, ref, topk, 2e-3)
    if name == "default" and gemm_block:
        g = gemm_scores(q, index, gemm_block, L)
        row["gemm_choices_vs_fp32_reference"] = choice_check(chosen_sets(g, topk), ref, topk, 2e-3)
        row["gemm_scores_relerr"] = float((g - ref).norm() / ref.norm())
        row["gemm_scores_ms"] = graph(lambda: gemm_scores(q, index, gemm_block, L))
        row["fused_scores_ms"] = graph(lambda: router.score_chunks(q, index, "keymax"))
    del ref
    parts = {"router": route, "shared": lambda: shared(sel), "unique": lambda: unique(None),
             "merge": lambda: merge_selections(o_u, l_u, o_s, l_s, sel)}  # fmt: skip
    for p, fn in parts.items():
        row[f"{p}_alone_ms"] = graph(fn)
    streams, errors = make_streams(dev, schedules)
    for s_, e_ in errors.items():
        row[f"step_{s_}_err"] = e_
    ref_out = None
    for s in schedules:
        if s in errors:
            continue
        fn = make_step(s, route, shared, unique, merge_selections, streams)
        try:
            out = fn()[0]
        except Exception as e:  # noqa: BLE001 - recorded; the other schedules go on
            row[f"step_{s}_err"] = repr(e)[-300:]
            continue
        ref_out = out if ref_out is None else ref_out
        row[f"step_{s}_relerr_vs_serial"] = float(
            (out.float() - ref_out.float()).norm() / ref_out.float().norm()
        )
        row[f"step_{s}_eager_ms"] = eager(fn)
        if s.startswith("green"):  # eager only: a failed capture would poison later graphs
            continue
        try:
            row[f"step_{s}_graph_ms"] = graph(fn)
        except Exception as e:  # noqa: BLE001 - the eager time stands; say why
            row[f"step_{s}_graph_err"] = repr(e)[-300:]
    row["step_none_graph_ms"] = graph(
        make_step("serial", lambda: sel, shared, unique, merge_selections, streams)
    )
    times = {
        k_: v_
        for k_, v_ in row.items()
        if k_.startswith("step_") and k_.endswith("_ms") and "none" not in k_
    }
    row["best_schedule"] = min(times, key=lambda k_: times[k_])
    row["step_best_ms"] = times[row["best_schedule"]]
    scorer = "two_stage" if name == "two_stage" else "keymax"
    s_bytes, s_flops, r_bytes, r_flops = step_cost(B, q, sel, index, shape, scorer)
    bw, peak = ceil["read_bytes_per_s"], ceil["gemm_flops_per_s"]
    f = floor_ms(s_bytes + r_bytes, s_flops + r_flops, bw, peak)
    fn_ = floor_ms(s_bytes, s_flops, bw, peak)
    row.update(floor_ms=f["floor_ms"], floor_bound=f["bound"], floor_no_router_ms=fn_["floor_ms"],
               router_flop_floor_ms=r_flops / peak * 1e3, router_flops=r_flops, router_bytes=r_bytes)  # fmt: skip
    row["fraction_serial"] = f["floor_ms"] / min(
        row.get("step_serial_graph_ms", 1e9), row["step_serial_eager_ms"]
    )
    row["fraction_best"] = f["floor_ms"] / row["step_best_ms"]
    row["fraction_no_router"] = fn_["floor_ms"] / row["step_none_graph_ms"]
    row["router_fraction_of_own_flop_floor"] = row["router_flop_floor_ms"] / row["router_alone_ms"]
    crit = row["router_alone_ms"] + row["shared_alone_ms"] + row["merge_alone_ms"]
    row["critical_path_ms"] = crit
    row["reachable_fraction"] = f["floor_ms"] / max(
        crit, row["unique_alone_ms"] + row["merge_alone_ms"], f["floor_ms"]
    )
    row["router_ms_allowed_at_0.9"] = (
        f["floor_ms"] / 0.9 - row["shared_alone_ms"] - row["merge_alone_ms"]
    )
    return row


def main(argv: list[str] | None = None) -> int:
    from moska.bench.common import environment

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1024, 256, 64])
    ap.add_argument("--routers", nargs="+", default=["default", "two_stage"],
                    help="default, default_p{n}, default_p{n}_b{B}w{W}s{S}, two_stage")  # fmt: skip
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES),
                    help="serial, unique_side, route_side, prio, route_side_split{n}, green{n}")  # fmt: skip
    ap.add_argument("--gemm-block", type=int, default=32,
                    help="chunks per torch.matmul of the GEMM form (0: not timed)")  # fmt: skip
    ap.add_argument(
        "--budget-s", type=float, default=90.0, help="rows started after this are skipped"
    )
    ap.add_argument("--corun-batch", type=int, default=0,
                    help="B of the co-run probe (router_corun.py; 0: not run)")  # fmt: skip
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy shapes, Triton interpreter")
    ap.add_argument("--out", default="router_overlap.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    dry = args.cpu_dry_run or not torch.cuda.is_available()
    dev, dt, shape, ceil, (k, v, offs, index) = step_library(dry)
    if dry:
        batches, gemm_block = [b for b in args.batch if b <= 8] or [4], min(args.gemm_block, 4)
    else:
        batches, gemm_block = args.batch, args.gemm_block
    rows, skipped = [], []
    for B in batches:
        for name in args.routers:
            if time.time() - t0 > args.budget_s:
                skipped.append(f"{name}@{B}")
                continue
            try:
                row = batch_row(B, name, (k, v, offs, index), shape, ceil, dev, args.schedules,
                                gemm_block if B <= 1024 else 0)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - record the failure, go on
                row = {"B": B, "router": name, "error": repr(e)[-600:]}
            print(json.dumps({k_: round(v_, 4) if isinstance(v_, float) else v_
                              for k_, v_ in row.items()}), flush=True)  # fmt: skip
            rows.append(row)
            if dev == "cuda":
                torch.cuda.empty_cache()
    corun = None
    if args.corun_batch and time.time() - t0 <= args.budget_s:
        from moska.bench.router_corun import corun_row

        corun = corun_row(args.corun_batch if not dry else 4, shape, index, dev)
        print(json.dumps({k_: round(v_, 3) for k_, v_ in corun.items()}), flush=True)
    summary = {}
    for r in rows:
        tag = f"{r['router']}_b{r['B']}"
        for key in ("fraction_serial", "fraction_best", "fraction_no_router", "reachable_fraction",
                    "router_alone_ms", "router_fraction_of_own_flop_floor", "step_best_ms",
                    "best_schedule", "critical_path_ms", "floor_ms", "gemm_scores_ms",
                    "fused_scores_ms", "router_ms_allowed_at_0.9"):  # fmt: skip
            if key in r:
                summary[f"{key}_{tag}"] = r[key]
        for key in ("choices_vs_fp32_reference", "gemm_choices_vs_fp32_reference"):
            if key in r:
                summary[f"{key}_ok_{tag}"] = r[key]["ok"]
    bad = [
        f"{k_}={v_:.3f}"
        for k_, v_ in summary.items()
        if "fraction" in k_ and isinstance(v_, float) and v_ > 1.0
    ]
    res = {**environment(), "dtype": str(dt), "shapes": shape, "ceilings": ceil, "rows": rows,
           "skipped": skipped, "corun": corun, "floor_check": bad, "summary": summary, "wall_s": time.time() - t0,
           "notes": __doc__}  # fmt: skip
    res["git_commit"] = os.environ.get("MOSKA_GIT_COMMIT", res.get("git_commit"))
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    print_table(rows)
    for k_, v_ in (corun or {}).items():
        if k_.endswith(("_overlap", "_GBps")) or (k_.endswith("_ms") and "_with_" not in k_):
            print(f"corun {k_}: {v_:.3f}")
    print(f"wrote {args.out} ({res['wall_s']:.0f} s); floor check: {bad or 'ok'}")
    return 1 if bad else 0


def print_table(rows: list[dict]) -> None:
    f = lambda x, n=3: "-" if x is None else f"{x:.{n}f}"
    print(f"{'B':>5} {'router':<9} {'router':>7} {'shared':>7} {'unique':>7} {'merge':>6} "
          f"{'serial':>7} {'best':>7} {'schedule':<24} {'floor':>6} {'f_ser':>5} {'f_best':>6} "
          f"{'f_none':>6} {'reach':>5} {'ok':>3}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['B']:>5} {r['router']:<9} ERROR {r['error'][:150]}")
            continue
        g = r.get
        print(f"{r['B']:>5} {r['router']:<9} {f(g('router_alone_ms')):>7} {f(g('shared_alone_ms')):>7} "
              f"{f(g('unique_alone_ms')):>7} {f(g('merge_alone_ms')):>6} {f(g('step_serial_graph_ms')):>7} "
              f"{f(g('step_best_ms')):>7} {g('best_schedule', '')[5:]:<24} {f(g('floor_ms')):>6} "
              f"{f(g('fraction_serial'), 2):>5} {f(g('fraction_best'), 2):>6} {f(g('fraction_no_router'), 2):>6} "
              f"{f(g('reachable_fraction'), 2):>5} {'y' if g('choices_vs_fp32_reference', {}).get('ok') else 'n':>3}")  # fmt: skip
        if "gemm_scores_ms" in r:
            print(
                f"      default scores: fused kernel {f(g('fused_scores_ms'))} ms vs torch.matmul+amax "
                f"{f(g('gemm_scores_ms'))} ms (choices ok: {g('gemm_choices_vs_fp32_reference', {}).get('ok')})"
            )


if __name__ == "__main__":
    raise SystemExit(main())
