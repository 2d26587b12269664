"""One-off: can the two-stage router's key-max launch hide behind the unique-KV attention?

The last #4 gap: at B = 1024 the decode-attention step with the two-stage router runs at
0.877 of its roofline floor (target 0.9), while with the mean router it reaches 0.951. The
step is memory-bound (the unique KV is 16 GB of the 21 GB it reads); key-max is
compute-bound (about 0.35 ms of tensor-core work at the GEMM peak). Yet the "prio" step
(router + shared attention on a high-priority side stream, unique on the current one)
adds the router's whole time. This prototype measures why and what ordering hides it:

1. resources per program (registers, spills, shared memory) of the three big kernels,
   which decide whether their programs can sit on one SM together;
2. the unique attention and the key-max launch alone, then launched together on two
   streams (key-max capped at n programs per SM or not), eager and as a CUDA graph;
3. a profiler timeline of the eager prio step: when each kernel starts and ends;
4. full steps: serial, prio (as shipped) and variants.

With --shared-cap it caps the grouped shared attention's grid (its programs loop over the
work items) so that the unique attention's programs fit beside it, and times the step with
and without the router (router_overlap_shared_cap.json).

With --repeat it times the candidate caps of both kernels in interleaved rounds at
B = 256 and 1024, so that run-to-run drift hits every candidate alike
(router_overlap_repeat.json).

With --sweep it instead sweeps register caps, tile sizes and grid caps of the key-max
launch against the unique attention's warps, alone and together, then times full steps of
the best pairs (router_overlap_sweep.json).

Usage on the GPU machine:
PYTHONPATH=. python3 bench/router_overlap_proto.py [--sweep | --shared-cap | --repeat]
(JSON in $OUT)
"""

import json
import os
import sys
import time

import torch
import triton

from moska.bench.common import capture_graph
from moska.bench.kernels_util import DEV, DT, HKV, HQ, SCALE, D, bench, bench_graph, log, rel
from moska.bench.kernels_util import ceilings, sorted_sel
from moska.kernels import router
from moska.kernels.merge import merge_selections
from moska.kernels.paged_attention import _paged_attention_kernel, paged_decode_attention
from moska.kernels.router_scores import _keymax_scores_kernel, keymax_pair_scores
from moska.kernels.selections import from_topk
from moska.kernels.shared_attention import grouped_shared_attention

C, L, TOPK, U, B = 256, 4096, 8, 4096, 1024
S = C * L  # shared tokens


def resources(fn):
    """Registers, spills and shared memory of every compiled variant of a Triton kernel."""
    out = []
    for cache in fn.device_caches.values():
        kernels = cache[0] if isinstance(cache, tuple) else cache
        for k in kernels.values():
            try:
                k._init_handles()
                out.append(
                    dict(
                        regs=k.n_regs,
                        spills=k.n_spills,
                        shared=k.metadata.shared,
                        warps=k.metadata.num_warps,
                        stages=k.metadata.num_stages,
                    )
                )
            except Exception as e:  # noqa: BLE001 - a report, not a failure
                out.append(dict(err=repr(e)[-200:]))
    return out


def timeline(fn, path):
    """Kernel intervals (us from the first kernel) of one eager call, from a profiler trace."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(path)
    ev = [e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"]
    t0 = min(e["ts"] for e in ev)
    rows = [
        (round(e["ts"] - t0, 1), round(e["dur"], 1), e["args"].get("stream"), e["name"][:40])
        for e in sorted(ev, key=lambda e: e["ts"])
    ]
    os.remove(path)
    return [r for r in rows if r[1] > 5]  # the big kernels only


def _start(**fields):
    """Seed, ceilings, the shared library (1M tokens in 4096-token chunks) and its routing
    index: (k, v, offsets, index, SMs, copy GB/s, res); `res` starts the JSON with the
    environment and `fields`."""
    torch.manual_seed(0)
    peak, bw = ceilings()
    k = torch.randn(S, HKV, D, device=DEV, dtype=DT)
    v = torch.randn_like(k)
    offs = torch.arange(0, S + 1, L, dtype=torch.int32, device=DEV)
    res = dict(
        command="PYTHONPATH=. python3 " + " ".join(sys.argv), **fields, C=C, L=L, U=U,
        topk=TOPK, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, dtype="bf16", gemm_peak_tflops=peak, copy_GBps=bw,
    )  # fmt: skip
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    return k, v, offs, router.build_routing_index(k, offs), sms, bw, res


def _requests(b):
    """b queries and their unique KV: U tokens each in 16-token pages (identity tables)."""
    q = torch.randn(b, HQ, D, device=DEV, dtype=DT)
    kc = torch.randn(b * U // 16, 16, HKV, D, device=DEV, dtype=DT)
    bt = torch.arange(b * U // 16, dtype=torch.int32, device=DEV).view(b, U // 16)
    sl = torch.full((b,), U, dtype=torch.int32, device=DEV)
    return q, kc, torch.randn_like(kc), bt, sl


def _shortlist_pairs(q, index):
    """The two-stage shortlist's (request, chunk) pairs, as router.route makes them."""
    cheap = router.score_chunks(q, index, "bound").sum(dim=1)
    return from_topk(cheap.topk(4 * TOPK, dim=-1).indices[:, None, :], 1, C)


def _save(res, name, t_start):
    out_dir = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out_dir, exist_ok=True)
    res["wall_s"] = time.time() - t_start
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(res, f, indent=1)


def main():
    t_start = time.time()
    k, v, offs, index, sms, bw, res = _start(B=B)
    q, kc, vc, bt, sl = _requests(B)
    pairs = _shortlist_pairs(q, index)

    def km(progs=None, stages=5):
        return keymax_pair_scores(
            q, index.basis, index.lowrank_keys, offs, pairs.req, pairs.chunk,
            block_b=32, block_n=64, num_stages=stages, max_programs=progs,
        )  # fmt: skip

    def un(**kw):
        return paged_decode_attention(q, kc, vc, bt, sl, SCALE, **kw)

    # correctness: every variant against the default call
    ref_k, ref_u = km(), un()[0]
    check = {f"km_p{p}": rel(km(p * sms), ref_k) for p in (1, 2, 4)}
    check["km_s3"] = rel(km(stages=3), ref_k)
    for name, kw in (("un_s1", dict(num_stages=1)), ("un_w8", dict(num_warps=8)),
                     ("un_n64", dict(block_n=64))):  # fmt: skip
        check[name] = rel(un(**kw)[0], ref_u)
    res["check_relerr"] = check
    log("check", json.dumps(check))
    assert all(e < 1e-2 for e in check.values()), check

    t = {}
    t["unique"] = bench_graph(un)
    for name, kw in (("unique_s1", dict(num_stages=1)), ("unique_w8", dict(num_warps=8)),
                     ("unique_n64", dict(block_n=64))):  # fmt: skip
        t[name] = bench_graph(lambda kw=kw: un(**kw))
    t["keymax"] = bench_graph(km)
    for p in (1, 2, 4):
        t[f"keymax_p{p}"] = bench_graph(lambda p=p: km(p * sms))

    high = torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[1])
    low = torch.cuda.Stream()

    def together(progs=None, first="unique", un_kw=None, prio=True):
        side = high if prio else low

        def run():
            cur = torch.cuda.current_stream()
            side.wait_stream(cur)
            if first == "unique":
                o = un(**(un_kw or {}))
                with torch.cuda.stream(side):
                    s = km(progs)
            else:
                with torch.cuda.stream(side):
                    s = km(progs)
                o = un(**(un_kw or {}))
            cur.wait_stream(side)
            return o, s

        return run

    for p in (None, 1, 2):
        tag = "" if p is None else f"_p{p}"
        progs = None if p is None else p * sms
        for first in ("unique", "keymax"):
            fn = together(progs, first)
            t[f"both{tag}_{first}_first_eager"] = bench(fn)
            t[f"both{tag}_{first}_first_graph"] = bench_graph(fn)
        t[f"both{tag}_lowprio_graph"] = bench_graph(together(progs, prio=False))
    t["both_p1_unique_s1_graph"] = bench_graph(together(sms, un_kw=dict(num_stages=1)))
    res["resources"] = {
        "paged": resources(_paged_attention_kernel),
        "keymax": resources(_keymax_scores_kernel),
    }
    log("resources", json.dumps(res["resources"]))
    res["timeline_both_eager"] = timeline(together(), "/tmp/trace_both.json")

    # full steps on the routed selections
    def step(mode, scorer="two_stage", progs=None, un_kw=None):
        def run():
            cur = torch.cuda.current_stream()

            def shared():
                s_ = router.route(q, index, TOPK, scorer=scorer, keymax_programs=progs)
                return (*grouped_shared_attention(q, k, v, offs, s_, SCALE), s_)

            if mode == "serial":
                o_s, lse_s, s_ = shared()
                o_u, lse_u = un(**(un_kw or {}))
            else:
                high.wait_stream(cur)
                with torch.cuda.stream(high):
                    o_s, lse_s, s_ = shared()
                o_u, lse_u = un(**(un_kw or {}))
                cur.wait_stream(high)
            return merge_selections(o_u, lse_u, o_s, lse_s, s_)

        return run

    fixed = sorted_sel(torch.rand(B, C, device=DEV).topk(TOPK, -1).indices, C)

    def attention_only():
        o_s, lse_s = grouped_shared_attention(q, k, v, offs, fixed, SCALE)
        o_u, lse_u = un()
        return merge_selections(o_u, lse_u, o_s, lse_s, fixed)

    ref_step = step("serial")()[0]
    res["step_prio_relerr"] = rel(step("prio")()[0], ref_step)
    t["step_attention_only"] = bench_graph(attention_only)
    for name, fn in (
        ("step_serial", step("serial")),
        ("step_prio", step("prio")),
        ("step_prio_p1", step("prio", progs=sms)),
        ("step_prio_p2", step("prio", progs=2 * sms)),
        ("step_prio_unique_s1", step("prio", un_kw=dict(num_stages=1))),
        ("step_prio_mean", step("prio", scorer="mean")),
    ):
        t[name + "_graph"] = bench_graph(fn)
        t[name + "_eager"] = bench(fn)
    res["timeline_step_prio_eager"] = timeline(step("prio"), "/tmp/trace_step.json")
    kv_bytes = (C * L + B * U) * HKV * D * 2 * 2 + 2 * C * HKV * D * 2 + S * HKV * index.rank * 2
    floor = kv_bytes / bw / 1e6
    res["floor_two_stage_ms"] = floor
    res["times_ms"] = t
    _save(res, "router_overlap_proto.json", t_start)
    for r in res["timeline_both_eager"]:
        log("both", r)
    for r in res["timeline_step_prio_eager"]:
        log("step", r)
    log(f"floor (two-stage) {floor:.3f} ms")
    for name, ms in t.items():
        extra = f"  floor fraction {floor / ms:.3f}" if name.startswith("step_") else ""
        log(f"{name:40s} {ms:8.3f} ms{extra}")


def sweep():
    t_start = time.time()
    k, v, offs, index, sms, bw, res = _start(B=B)
    q, kc, vc, bt, sl = _requests(B)
    pairs = _shortlist_pairs(q, index)
    # key-max variants: (block_b, block_n, warps, stages, maxnreg)
    KM = {
        "km_default": (32, 64, 4, 5, None),
        "km_r128": (32, 64, 4, 5, 128),
        "km_r96": (32, 64, 4, 5, 96),
        "km_b16": (16, 64, 4, 4, None),
        "km_b16_r96": (16, 64, 4, 4, 96),
        "km_b16_r64": (16, 64, 4, 4, 64),
        "km_n32_r96": (32, 32, 4, 5, 96),
    }
    UN = {"un_w4": dict(num_warps=4), "un_w8": dict(num_warps=8)}

    def km(name, progs=None):
        bb, bn, w, st, nreg = KM[name]
        return keymax_pair_scores(
            q, index.basis, index.lowrank_keys, offs, pairs.req, pairs.chunk, block_b=bb,
            block_n=bn, num_warps=w, num_stages=st, max_programs=progs, maxnreg=nreg,
        )  # fmt: skip

    def un(name):
        return paged_decode_attention(q, kc, vc, bt, sl, SCALE, **UN[name])

    ref_k, ref_u = km("km_default"), un("un_w4")[0]
    check = {n: rel(km(n), ref_k) for n in KM}
    check.update({n: rel(un(n)[0], ref_u) for n in UN})
    res["check_relerr"] = check
    log("check", json.dumps(check))
    assert all(e < 1e-2 for e in check.values()), check
    t = {}
    for n in UN:
        t[n] = bench_graph(lambda n=n: un(n))
    for n in KM:
        t[n] = bench_graph(lambda n=n: km(n))
    res["resources"] = {
        "paged": resources(_paged_attention_kernel),
        "keymax": resources(_keymax_scores_kernel),
    }
    log("resources", json.dumps(res["resources"]))
    high = torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[1])

    def together(kn, un_name, progs):
        def run():
            cur = torch.cuda.current_stream()
            high.wait_stream(cur)
            with torch.cuda.stream(high):
                s = km(kn, progs)
            o = un(un_name)
            cur.wait_stream(high)
            return o, s

        return run

    both = {}
    for un_name in UN:
        for kn in KM:
            for cap in (None, 1, 2):
                key = f"{un_name}+{kn}" + ("" if cap is None else f"_p{cap}")
                both[key] = bench_graph(together(kn, un_name, None if cap is None else cap * sms))
                log(f"{key:36s} {both[key]:.3f} (alone {t[un_name]:.3f} + {t[kn]:.3f})")
    res["alone_ms"] = t
    res["both_ms"] = both

    # full steps (prio, as the engine runs them) with the best pairs
    def step(kn, un_name, cap, scorer="two_stage"):
        def keymax_pairs(q_, index_, pair_req, pair_chunk, max_programs=None):
            bb, bn, w, st, nreg = KM[kn]
            return keymax_pair_scores(
                q_, index_.basis, index_.lowrank_keys, index_.chunk_offsets, pair_req,
                pair_chunk, block_b=bb, block_n=bn, num_warps=w, num_stages=st,
                max_programs=None if cap is None else cap * sms, maxnreg=nreg,
            )  # fmt: skip

        def run():
            router._keymax_pairs = keymax_pairs
            cur = torch.cuda.current_stream()
            high.wait_stream(cur)
            with torch.cuda.stream(high):
                s_ = router.route(q, index, TOPK, scorer=scorer)
                o_s, lse_s = grouped_shared_attention(q, k, v, offs, s_, SCALE)
            o_u, lse_u = un(un_name)
            cur.wait_stream(high)
            return merge_selections(o_u, lse_u, o_s, lse_s, s_)

        return run

    fixed = sorted_sel(torch.rand(B, C, device=DEV).topk(TOPK, -1).indices, C)

    def attention_only():
        o_s, lse_s = grouped_shared_attention(q, k, v, offs, fixed, SCALE)
        o_u, lse_u = un("un_w4")
        return merge_selections(o_u, lse_u, o_s, lse_s, fixed)

    shipped = router._keymax_pairs
    ref_step = step("km_default", "un_w4", None)()[0]
    kv_bytes = (C * L + B * U) * HKV * D * 2 * 2 + 2 * C * HKV * D * 2 + S * HKV * index.rank * 2
    floor = kv_bytes / bw / 1e6
    steps = {"attention_only": bench_graph(attention_only)}
    ranked = sorted(both, key=both.get)[:4]
    combos = [("km_default", "un_w4", None)]
    for key in ranked:
        pair, _, cap = key.partition("_p")
        un_name, kn = pair.split("+")
        combos.append((kn, un_name, int(cap) if cap else None))
    step_err = {}
    for kn, un_name, cap in combos:
        name = f"{un_name}+{kn}" + ("" if cap is None else f"_p{cap}")
        fn = step(kn, un_name, cap)
        step_err[name] = rel(fn()[0], ref_step)
        steps[name] = bench_graph(fn)
        log(f"step {name:36s} {steps[name]:.3f} ms  floor fraction {floor / steps[name]:.3f}")
    router._keymax_pairs = shipped
    res["step_relerr"] = step_err
    res["step_ms"] = steps
    res["floor_two_stage_ms"] = floor
    res["step_floor_fraction"] = {n: floor / ms for n, ms in steps.items()}
    _save(res, "router_overlap_sweep.json", t_start)
    log(f"floor {floor:.3f} ms; alone: " + ", ".join(f"{n} {ms:.3f}" for n, ms in t.items()))
    for n in ranked:
        log(f"both {n:36s} {both[n]:.3f}")
    for n, ms in steps.items():
        log(f"step {n:36s} {ms:.3f} ms  floor fraction {floor / ms:.3f}")


def shared_cap():
    t_start = time.time()
    k, v, offs, index, sms, bw, res = _start(B=B)
    q, kc, vc, bt, sl = _requests(B)
    fixed = sorted_sel(torch.rand(B, C, device=DEV).topk(TOPK, -1).indices, C)
    high = torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[1])
    CAPS = (None, 1, 2, 3)

    def sh(sel, cap):
        progs = None if cap is None else cap * sms
        return grouped_shared_attention(q, k, v, offs, sel, SCALE, max_programs=progs)

    def un():
        return paged_decode_attention(q, kc, vc, bt, sl, SCALE)

    ref = sh(fixed, None)
    check = {f"shared_p{c}": rel(sh(fixed, c)[0], ref[0]) for c in CAPS[1:]}
    log("check", json.dumps(check))
    assert all(e < 1e-2 for e in check.values()), check
    t = {"unique": bench_graph(un)}
    for c in CAPS:
        t[f"shared_p{c}"] = bench_graph(lambda c=c: sh(fixed, c))

    def step(cap, scorer=None, km_cap=None, mode="prio"):
        def run():
            cur = torch.cuda.current_stream()
            if mode == "serial":
                s_ = fixed if scorer is None else router.route(q, index, TOPK, scorer=scorer)
                o_s, lse_s = sh(s_, cap)
                o_u, lse_u = un()
            else:
                high.wait_stream(cur)
                with torch.cuda.stream(high):
                    s_ = fixed
                    if scorer is not None:
                        progs = None if km_cap is None else km_cap * sms
                        s_ = router.route(q, index, TOPK, scorer=scorer, keymax_programs=progs)
                    o_s, lse_s = sh(s_, cap)
                o_u, lse_u = un()
                cur.wait_stream(high)
            return merge_selections(o_u, lse_u, o_s, lse_s, s_)

        return run

    steps, errs = {}, {}
    ref_att = step(None, mode="serial")()[0]
    ref_two = step(None, "two_stage", mode="serial")()[0]
    steps["attention_serial"] = bench_graph(step(None, mode="serial"))
    for c in CAPS:
        fn = step(c)
        errs[f"attention_prio_p{c}"] = rel(fn()[0], ref_att)
        steps[f"attention_prio_p{c}"] = bench_graph(fn)
    for scorer in ("mean", "two_stage"):
        for c in CAPS:
            for km_cap in (None, 1) if scorer == "two_stage" else (None,):
                name = f"{scorer}_prio_p{c}" + ("" if km_cap is None else f"_km{km_cap}")
                fn = step(c, scorer, km_cap)
                if scorer == "two_stage":
                    errs[name] = rel(fn()[0], ref_two)
                steps[name] = bench_graph(fn)
    kv_bytes = (C * L + B * U) * HKV * D * 2 * 2 + 2 * C * HKV * D * 2
    floors = {
        "attention": (C * L + B * U) * HKV * D * 2 * 2 / bw / 1e6,
        "mean": kv_bytes / bw / 1e6,
        "two_stage": (kv_bytes + S * HKV * index.rank * 2) / bw / 1e6,
    }
    res.update(check_relerr=check, step_relerr=errs, alone_ms=t, step_ms=steps, floors_ms=floors)
    res["step_floor_fraction"] = {n: floors[n.split("_p")[0].split("_prio")[0].split("_serial")[0]]
                                  / ms for n, ms in steps.items()}  # fmt: skip
    _save(res, "router_overlap_shared_cap.json", t_start)
    log("errs", json.dumps(errs))
    log("alone: " + ", ".join(f"{n} {ms:.3f}" for n, ms in t.items()))
    for n, ms in steps.items():
        log(f"step {n:36s} {ms:.3f} ms  floor fraction {res['step_floor_fraction'][n]:.3f}")


def repeat(rounds=5):
    t_start = time.time()
    k, v, offs, index, sms, bw, res = _start(rounds=rounds, rows=[])
    high = torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[1])
    # (shared attention programs per SM, key-max programs per SM); None = uncapped
    CANDIDATES = [(None, None), (2, 1), (2, None), (None, 1), (2, 2)]
    for b in (256, 1024):
        q, kc, vc, bt, sl = _requests(b)

        def step(scorer, sh_cap, km_cap):
            def run():
                cur = torch.cuda.current_stream()
                high.wait_stream(cur)
                with torch.cuda.stream(high):
                    kp = None if km_cap is None else km_cap * sms
                    s_ = router.route(q, index, TOPK, scorer=scorer, keymax_programs=kp)
                    sp = None if sh_cap is None else sh_cap * sms
                    o_s, lse_s = grouped_shared_attention(q, k, v, offs, s_, SCALE, max_programs=sp)
                o_u, lse_u = paged_decode_attention(q, kc, vc, bt, sl, SCALE)
                cur.wait_stream(high)
                return merge_selections(o_u, lse_u, o_s, lse_s, s_)

            return run

        fns, errs = {}, {}
        for scorer in ("mean", "two_stage"):
            ref = step(scorer, None, None)()[0]
            for sh_cap, km_cap in CANDIDATES:
                if scorer == "mean" and km_cap is not None:
                    continue
                name = f"{scorer}_sh{sh_cap}_km{km_cap}"
                fns[name] = step(scorer, sh_cap, km_cap)
                errs[name] = rel(fns[name]()[0], ref)
        assert all(e < 1e-2 for e in errs.values()), errs
        graphs = {n: capture_graph(f) for n, f in fns.items()}
        times = {n: [] for n in fns}
        for _ in range(rounds):
            for n, g in graphs.items():
                times[n].append(bench(g))
        del graphs
        u_bytes = b * U * HKV * D * 2 * 2
        touched = int(torch.unique(router.route(q, index, TOPK, scorer="two_stage").chunk).numel())
        floors = {
            "mean": ((touched * L) * HKV * D * 4 + u_bytes + 2 * C * HKV * D * 2) / bw / 1e6,
        }
        floors["two_stage"] = floors["mean"] + S * HKV * index.rank * 2 / bw / 1e6
        row = dict(B=b, touched=touched, floors_ms=floors, relerr=errs, times_ms=times)
        row["median_ms"] = {n: sorted(x)[len(x) // 2] for n, x in times.items()}
        row["floor_fraction"] = {
            n: floors[n.split("_sh")[0]] / ms for n, ms in row["median_ms"].items()
        }
        res["rows"].append(row)
        for n, ms in row["median_ms"].items():
            spread = max(times[n]) - min(times[n])
            log(f"B={b:5d} {n:28s} {ms:.3f} ms (spread {spread:.3f})  "
                f"floor fraction {row['floor_fraction'][n]:.3f}")  # fmt: skip
    _save(res, "router_overlap_repeat.json", t_start)


if __name__ == "__main__":
    if "--repeat" in sys.argv:
        repeat()
    elif "--sweep" in sys.argv:
        sweep()
    elif "--shared-cap" in sys.argv:
        shared_cap()
    else:
        main()
