"""`moska bench trace`: replay a Mooncake-format trace against a prefill/decode cluster and,
in the same run, against the same number of colocated (`--role both`) instances behind a
round-robin front end.

Trace rows (JSONL, Mooncake's format): `timestamp` (ms from the start), `input_length`,
`output_length`, `hash_ids` (one per 512-token block; equal ids mean equal content). A
prompt is built block by block, each block's tokens drawn from a generator seeded by its
hash id, so equal ids give equal tokens and the clusters' prefix caches see the trace's
sharing. `--block-tokens` shrinks the 512-token blocks (the CPU form: the tiny model on a
few cores), scaling input lengths alike. Without `--trace` a synthetic trace is made:
Poisson arrivals, prompts that start with one of a few shared prefixes (Zipf-popular) and
end with blocks of their own.

Reported per system: goodput (requests meeting both SLOs per second of the run), TTFT and
TPOT p50/p99 of the completed requests, the share of admitted requests within both SLOs,
the share of all requests within the TTFT SLO, rejections (429), failures and, for P/D,
the prefix-cache hit rate of its prefill instances (prompt tokens found cached).

With several GPUs each instance gets its own (`pd/gpu_placement.py`; `--gpus`,
`--gpus-per-instance`); both systems stay up, so a GPU holds one instance of each (give
them `--gpu-memory-utilization` to share it). `--rates R1,R2,..` replays the synthetic
trace at each rate (systems started once) and reports each; `summary.regime` is the
lowest rate where colocated met the TTFT SLO for under 80% of requests (the issue's).

The client (`trace_client.py`) replays from a process of its own, its prompts and bodies
built before each replay: in the front ends' process its lag counted as TTFT (2 H200s,
60-100 req/s: TTFT p50 0.5-0.9 s where the P/D front end saw 0.15-0.19 s);
`--client-in-process` keeps the old way. Each request's send lag is reported.

    python -m moska.bench.trace --cpu-dry-run            # small synthetic trace, CPU
    python -m moska.bench.trace --trace FILE --pd 1:1 --speedup 2 --ttft-slo 2 --tpot-slo 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from moska.bench.trace_client import BLOCK, SERVED, ClientProcess, prompt_of, replay
from moska.bench.trace_summary import Result, stage_accuracy, summarize

__all__ = ["BLOCK", "Result", "load_trace", "prompt_of", "replay", "summarize", "synthesize"]
SUMMARY_KEYS = (
    "goodput_rps",
    "within_both_slos_of_admitted",
    "within_ttft_slo_of_all",
    "rejected_429",
    "ttft_p99_s",
    "tpot_p99_s",
    "prefix_hit_rate",
    "unmeasured",  # completed, all tokens in one event: no TTFT or TPOT seen (never good)
)
BY_RATE_KEYS = (*SUMMARY_KEYS[:3], "ttft_p99_s", "tpot_p99_s", "unmeasured")


def synthesize(
    n: int,
    rate_per_s: float,
    *,
    num_prefixes: int = 4,
    prefix_blocks: int = 6,
    own_blocks: tuple[int, int] = (1, 3),
    output_length: tuple[int, int] = (16, 48),
    seed: int = 0,
) -> list[dict]:
    """A trace with shared-prefix structure: each request starts with one of
    `num_prefixes` prefixes (Zipf popularity, each `prefix_blocks` blocks) and ends with
    blocks of its own."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(num_prefixes)]
    rows, t, next_id = [], 0.0, num_prefixes * prefix_blocks
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        p = rng.choices(range(num_prefixes), weights)[0]
        ids = list(range(p * prefix_blocks, (p + 1) * prefix_blocks))
        own = rng.randint(*own_blocks)
        ids += list(range(next_id, next_id + own))
        next_id += own
        rows.append(
            {
                "timestamp": int(t * 1000),
                "input_length": len(ids) * BLOCK - rng.randrange(BLOCK // 2),
                "output_length": rng.randint(*output_length),
                "hash_ids": ids,
            }
        )
    return rows


def load_trace(path: str | Path) -> list[dict]:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"timestamp", "input_length", "output_length", "hash_ids"} - set(row)
        if missing:
            raise ValueError(f"{path}:{i + 1}: a trace row needs {sorted(missing)}")
        rows.append(row)
    return rows


@contextlib.contextmanager
def running_system(kind: str, args):
    """Start the instances of one system and its front end; yields (FrontEnd, URL)."""
    from moska.bench.pd_device_check import gpus_of
    from moska.pd.cluster import discover, parse_pd, start_cluster
    from moska.pd.frontend import FrontEnd, FrontEndConfig
    from moska.pd.frontend_app import create_frontend_app
    from moska.pd.gpu_placement import parse_gpus
    from moska.pd.scheduler import SLO, GlobalScheduler
    from moska.server.background import background_server

    p, d = parse_pd(args.pd)
    serve_args = ["--device", args.device, "--max-model-len", str(args.max_model_len)]
    serve_args += ["--served-model-name", SERVED]
    serve_args += args.instance_args.split()
    counts = (p, d, 0) if kind == "pd" else (0, 0, p + d)
    cluster = start_cluster(*counts, model=args.model, serve_args=serve_args,
                            threads_per_instance=args.threads, gpus=parse_gpus(args.gpus),
                            gpus_per_instance=args.gpus_per_instance)  # fmt: skip
    try:
        instances = discover(cluster.urls)
        # name -> its CUDA_VISIBLE_DEVICES and the MiB it holds per GPU (nvidia-smi, once
        # loaded): that each instance is on its own GPU, seen rather than assumed
        args.placement[kind] = {
            n: {"visible": v, "gpu_mib": gpus_of(cluster.processes[n].pid)}
            for n, v in cluster.visible.items()
        }
        sched = None
        if kind == "pd":
            sched = GlobalScheduler(instances, SLO(args.ttft_slo, args.tpot_slo))
        config = FrontEndConfig(prefill_width=args.prefill_width)
        front = FrontEnd(instances, sched, config, cluster.processes)
        with background_server(create_frontend_app(front)) as url:
            if args.warmup:  # first requests pay one-off costs; the fits see some steps
                # (spread out, not one burst: a fit holding only a burst's long first steps
                # predicts every later prefill too slow and the front end rejects them all)
                warm = synthesize(args.warmup, args.warmup_rate, seed=args.seed + 1000,
                                  output_length=args.output_tokens)  # fmt: skip
                for row in warm:
                    row["hash_ids"] = [10**9 + h for h in row["hash_ids"]]
                if sched is not None:  # P/D admits the whole warm-up, as colocated does
                    sched.slo = SLO()
                asyncio.run(replay(url, warm, argparse.Namespace(**{**vars(args), "speedup": 1})))
                if sched is not None:
                    warmed(sched, instances, SLO(args.ttft_slo, args.tpot_slo))
            yield front, url
    finally:
        cluster.stop()


def warmed(sched, instances, slo) -> None:
    """The warm-up is over: the SLOs back on, the instances' step fits as they are now
    (their /pd/info; not the front end's last poll), and the stage lines and TPOT factors
    learnt from the warm-up's one-off costs dropped (`GlobalScheduler.forget_learnt`).
    Through the SLOs, a warm-up taught the front end nothing: on 2 H200s the CPU-sized
    default step fit predicted 1.5-2 s for 4K-token prompts (0.15 s real) and it rejected
    the warm-up and every measured request."""
    import httpx

    for inst in instances:
        coef = httpx.get(f"{inst.url}/pd/info", timeout=10).json().get("step_coef")
        if coef:
            sched.set_step_coef(inst, coef)
    sched.forget_learnt()
    sched.slo = slo


def measure(
    front, url: str, rows: list[dict], args, client: ClientProcess | None = None
) -> tuple[list[Result], float, dict]:
    """One replay of `rows` (in `client`'s process when given) and the front end's stats."""
    import httpx

    front.stats.__init__()
    if client is not None:
        results, wall = client.replay(url, rows, args)
    else:
        results, wall = asyncio.run(replay(url, rows, args))
    return results, wall, httpx.get(f"{url}/pd/stats", timeout=10).json()


def main(argv: list[str] | None = None) -> dict:
    from moska.bench.common import environment, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default=None, help="Mooncake JSONL trace (default: synthetic)")
    ap.add_argument("--requests", type=int, default=60, help="synthetic: number of requests")
    ap.add_argument("--rate", type=float, default=2.0, help="synthetic: requests per second")
    ap.add_argument("--rates", default=None, help="synthetic: a sweep, e.g. 8,16,32 (each "
                    "rate --requests x rate / --rate requests)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speedup", type=float, default=1.0, help="divide trace times by this")
    ap.add_argument("--block-tokens", type=int, default=BLOCK, help="tokens per hash id")
    ap.add_argument("--max-output", type=int, default=1 << 20, help="cap on output tokens")
    ap.add_argument("--pd", default="1:1", help="P:D; the baseline runs P+D colocated")
    ap.add_argument("--prefill-width", type=int, default=1,
                    help="P/D: prefills in flight per prefill instance (0: no gate)")  # fmt: skip
    ap.add_argument("--ttft-slo", type=float, default=2.0)
    ap.add_argument("--tpot-slo", type=float, default=0.2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--instance-args", default="", help="more `moska serve` flags")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per instance")
    ap.add_argument("--gpus", default=None, help="GPUs to place instances on (default all)")
    ap.add_argument("--gpus-per-instance", type=int, default=1, help="0: all share the GPUs")
    ap.add_argument("--warmup", type=int, default=8, help="requests sent before measuring")
    ap.add_argument("--warmup-rate", type=float, default=4.0,
                    help="their rate (a busy one meets the batch shapes of the measured "
                    "rates: colocated's first replay on 2 H200s ran 10x slow)")  # fmt: skip
    ap.add_argument(
        "--output-tokens",
        default="16,48",
        help="synthetic: output lengths LO,HI (Mooncake's trace: ~180 on average)",
    )
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--systems", default="colocated,pd")
    ap.add_argument("--rounds", type=int, default=2, help="alternating replays per system")
    ap.add_argument("--client-in-process", action="store_true",
                    help="replay from the front ends' process (before session 15: its lag "
                    "counted as TTFT)")  # fmt: skip
    ap.add_argument("--out", default="bench/results/pd_trace.json")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="small CPU form: tiny model, 32-token blocks, short outputs")  # fmt: skip
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        args.device, args.block_tokens, args.threads = "cpu", 32, args.threads or 1
        args.max_output = min(args.max_output, 24)
        args.max_model_len = min(args.max_model_len, 1024)
        args.instance_args = f"--num-kv-blocks 2048 {args.instance_args}".strip()
        if args.out == "bench/results/pd_trace.json":
            args.out = "bench/results/pd_trace_cpu.json"
    args.placement = {}
    lo, hi = (int(x) for x in args.output_tokens.split(","))
    args.output_tokens = (lo, hi)
    rows = load_trace(args.trace) if args.trace else synthesize(args.requests, args.rate,
                                                                 seed=args.seed,
                                                                 output_length=(lo, hi))  # fmt: skip
    rates = [float(r) for r in args.rates.split(",")] if args.rates and not args.trace else []
    report: dict[str, Any] = {
        "benchmark": "pd_trace",
        "environment": environment(),
        "trace": args.trace or "synthetic",
        "config": {k: v for k, v in vars(args).items() if k != "cpu_dry_run"}
        | {
            "cpu_dry_run": args.cpu_dry_run,
            "rows": len(rows),
            "mean_prompt_tokens": round(
                float(np.mean([len(prompt_of(r, args.block_tokens)) for r in rows])), 1
            ),
        },
        "systems": {},
    }
    kinds = args.systems.split(",")
    with contextlib.ExitStack() as stack:
        # every system is up before any is measured, and the rounds alternate between
        # them, so that a change in this host's load hits both alike
        # the client in a process of its own, started while the systems start
        client = None if args.client_in_process else ClientProcess()
        if client is not None:
            stack.callback(client.close)
        fronts = {k: stack.enter_context(running_system(k, args)) for k in kinds}
        if not rates:
            report["systems"] = _rounds(fronts, kinds, rows, args.rate, args, client)
        else:
            report["by_rate"] = {}
            for rate in rates:  # written after each: a run cut short keeps the rates done
                report["by_rate"][str(rate)] = _rounds(fronts, kinds, None, rate, args, client)
                write_json(args.out, report)
    report["placement"] = args.placement
    if rates:
        by = report["by_rate"]
        share = {r: v.get("colocated", {}).get("within_ttft_slo_of_all") for r, v in by.items()}
        regime = [r for r, x in share.items() if x is not None and x < 0.8]
        chosen = regime[0] if regime else str(rates[-1])
        report["systems"] = by[chosen]
        report["regime"] = {"rate": chosen, "in_regime": bool(regime)}
    systems = report["systems"]
    report["summary"] = {k: {m: v.get(m) for m in SUMMARY_KEYS} for k, v in systems.items()}
    if rates:
        report["summary"]["regime"] = report["regime"]
        report["summary"]["by_rate"] = {
            r: {k: {m: v[k].get(m) for m in BY_RATE_KEYS} for k in v}
            for r, v in report["by_rate"].items()
        }
        for r, v in report["by_rate"].items():
            if "pd" in v:
                pd = report["summary"]["by_rate"][r]["pd"]
                pd |= {m: v["pd"].get(m) for m in ("rejected_429", "stage_pred_over_observed")}
    if {"pd", "colocated"} <= set(systems):
        report["summary"]["pd_goodput_over_colocated"] = (
            round(systems["pd"]["goodput_rps"] / systems["colocated"]["goodput_rps"], 3)
            if systems["colocated"]["goodput_rps"]
            else None
        )
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


def _rounds(
    fronts: dict, kinds: list[str], rows: list[dict] | None, rate: float, args,
    client: ClientProcess | None = None,
) -> dict:  # fmt: skip
    """`args.rounds` alternating replays of each system (the trace's `rows`, or synthetic
    ones at `rate`: `args.requests` scaled by rate / `args.rate`); each system's summary."""
    gathered: dict[str, list] = {k: [[], 0.0, []] for k in kinds}  # results, wall, stats
    per_round: dict[str, list[dict]] = {k: [] for k in kinds}  # each replay's summary
    n = max(1, round(args.requests * rate / args.rate))
    for r in range(args.rounds):
        rows_r = rows if rows is not None else synthesize(n, rate, seed=args.seed + r,
                                                          output_length=args.output_tokens)  # fmt: skip
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            front, url = fronts[kind]
            results, wall, stats = measure(front, url, rows_r, args, client)
            gathered[kind][0] += results
            gathered[kind][1] += wall
            gathered[kind][2].append(stats)
            one = summarize(results, wall, args.ttft_slo, args.tpot_slo)
            per_round[kind].append({m: one.get(m) for m in BY_RATE_KEYS})
            print(f"rate {rate} round {r} {kind}", json.dumps(one), flush=True)
    out_all = {}
    for kind, (results, wall, stats) in gathered.items():
        out = summarize(results, wall, args.ttft_slo, args.tpot_slo)
        prompt = sum(s.get("prompt_tokens", 0) for s in stats)
        cached = sum(s.get("cached_tokens", 0) for s in stats)
        out["prefix_hit_rate"] = round(cached / prompt, 4) if prompt else None
        if kind == "pd":  # predicted over observed prefill stage, admitted requests
            out["stage_pred_over_observed"] = stage_accuracy(stats)
            out["probes_since_warmup"] = stats[-1].get("probes") if stats else None
        out["per_round"] = per_round[kind]  # is a result in every replay or in some?
        out["front_end_per_round"] = stats  # P/D: each decision's inputs (`decisions`)
        # per request, in sending order: sent at (monotonic s, as the decisions' `t`),
        # HTTP status, TTFT s, TPOT s (None unless completed), sent this late (s)
        out["per_request"] = [
            [round(r.arrival, 4), r.status, r.ttft_s and round(r.ttft_s, 4),
             r.tpot_s and round(r.tpot_s, 4), round(r.send_lag_s, 4)]
            for r in results
        ]  # fmt: skip
        out_all[kind] = out
    return out_all


if __name__ == "__main__":
    main()
