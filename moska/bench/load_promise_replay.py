"""Replays kept `moska bench load --trace` bursts through the learnt promise scale
(`server/admission_promises.PromiseScale`) offline: would scaling each group's promises by
how its earlier ones came out have brought more 429s within 2x of their drain?

Each kept 429 row has its promise (`promised_s`, made without a scale) and the drain its
probe observed (an interval, `load_drain`: the best drain these older traces hold; the
own-retry score came in session 17). The 429s of a run's bursts go through one scale in
time order. A promise is made when its 429 came (`t_status`). The scale sees a promise
come true when the drain's upper end has passed, as the server sees its own retry admitted
(checks `check_s` apart). The raw promises and the scaled ones are then scored the same
way (`load_drain.within_2x_band`). Also the session-17 device runs without learning, scored by
own-body retries (`load_retry`): each retried 429's drain is bracketed by its retries, the
scale learns from the bracket's middle once its upper end has passed, and a promise
passed through the scale is scored at that middle (`replay_own`).
`python -m moska.bench.load_promise_replay --out X.json`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from pathlib import Path
from typing import Any

from moska.bench.common import environment
from moska.bench.load_door_replay import RESULTS, read_result
from moska.bench.load_drain import GROUPS, within_2x_band
from moska.server.admission_promises import PromiseScale
from moska.server.queue_replay import RequestCost

# runs (one scale each): the kept bursts of one server, in the order they ran
RUNS = {
    "session14_quiet": [f"load_bursts_cpu_library_session14_quiet_{n}" for n in (64, 300, 1000)],
    "session14_quiet2": [f"load_bursts_cpu_library_session14_quiet2_{n}" for n in (64, 300, 1000)],
    "session14_final": [f"load_bursts_cpu_library_session14_final_{n}" for n in (64, 300, 1000)],
    "session14_doormix": [f"load_bursts_cpu_library_session14_doormix_{n}" for n in (300, 1000)],
    "session14_spike": [f"load_bursts_cpu_library_session14_spike_{n}" for n in (300, 1000)],
    "session15_loaded": [
        f"load_bursts_cpu_library_session15_loaded_{n}" for n in ("64", "300", "1000", "1000b")
    ],
}


def _group(row: dict) -> str:
    return f"{row['kind']}_{'door' if row['at_door'] else 'queue'}"


def replay_run(stems: list[str], scale: PromiseScale, gap_s: float = 30.0) -> list[dict]:
    """The rows of a run's bursts with `scaled_s`: the promise the scale would have made.
    Bursts are `gap_s` apart on one clock (each starts at its own 0)."""
    rows: list[dict] = []
    for b, stem in enumerate(stems):
        for burst in read_result(stem)["report"]["bursts"]:
            for r in burst["rejections"]:
                if r["promised_s"] is not None:
                    rows.append(r | {"t": b * gap_s + r["t_status"]})
    rows.sort(key=lambda r: r["t"])
    true_at = {i: r["t"] + r["observed_hi_s"] for i, r in enumerate(rows)}

    def admits(cost: RequestCost) -> bool:
        return now >= true_at[cost.prompt_tokens]

    # one event per 429 and a decision every 50 ms (the probes' and retries' pace), so
    # due() checks as the server's would
    end = max(true_at.values(), default=0.0) + 1.0
    events = sorted({r["t"] for r in rows} | {0.05 * k for k in range(int(end / 0.05) + 1)})
    out, i = [], 0
    for now in events:
        while i < len(rows) and rows[i]["t"] <= now:
            r = rows[i]
            scaled = scale.promise(_group(r), RequestCost(i), r["promised_s"], r["t"])
            out.append(r | {"scaled_s": scaled})
            i += 1
        scale.due(now, admits)
    return out


def score(rows: list[dict]) -> dict[str, Any]:
    """Within 2x of the drain's interval, raw and scaled, over all rows and by group."""

    def both(mine: list[dict]) -> dict[str, Any]:
        scaled = [r | {"promised_s": r["scaled_s"]} for r in mine]
        return {"n": len(mine), "raw": within_2x_band(mine), "scaled": within_2x_band(scaled)}

    return {"all": both(rows)} | {g: both([r for r in rows if _group(r) == g]) for g in GROUPS}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", type=float, default=None, help="PromiseScale.memory_s")
    ap.add_argument("--alpha", type=float, default=None, help="PromiseScale.alpha")
    ap.add_argument(
        "--own",
        default="load_bursts_device_cpu_session17_call1_learn_off_lag_on,"
        "load_bursts_device_cpu_session17_call1_learn_off_lag_off",
        help="device runs without learning, scored by own retries, to replay the scale over",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    runs = {}
    kw: dict[str, Any] = {"memory_s": args.memory} if args.memory is not None else {}
    kw |= {"alpha": args.alpha} if args.alpha is not None else {}
    for name, stems in RUNS.items():
        scale = PromiseScale(**kw)
        rows = replay_run(stems, scale)
        runs[name] = score(rows) | {"scale_after": scale.state()}
        s = runs[name]
        print(name, json.dumps({k: v for k, v in s.items() if k != "scale_after"}))
    pooled = {
        k: sum(r["all"][k] * r["all"]["n"] for r in runs.values())
        / sum(r["all"]["n"] for r in runs.values())
        for k in ("raw", "scaled")
    }
    own = {
        stem: replay_own([str(RESULTS / f"{stem}.json.gz")], lambda: PromiseScale(**kw))
        for stem in args.own.split(",")
        if stem
    }
    for stem, o in own.items():
        print(stem, json.dumps(o))
    out = {
        "bench": "load_promise_replay",
        "own_retry_runs": own,
        "args": vars(args),
        "runs": runs,
        "summary": {"within_2x_pooled": pooled, "runs": len(runs)},
        "environment": environment(argv),
    }
    print(json.dumps(out["summary"]))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


def own_bracket(row: dict) -> tuple[float, float]:
    """The drain of an own-retried 429 (`load_retry`) as far as its retries tell:
    (last refused retry, first admitted retry] after it, s (inf: none admitted)."""
    sent = [v for v in row["retries"].values() if v[1] is not None]
    lo = max([t for t, ok in sent if not ok], default=0.0)
    hi = min([t for t, ok in sent if ok and t > lo], default=math.inf)
    return lo, hi


def own_verdict(p: float, lo: float, hi: float) -> float:
    """1 within 2x, 0 not, or for a drain only bracketed, the drain at the bracket's
    geometric middle (2 x lo with none admitted; hi / 2 with none refused)."""
    d = 2 * lo if math.isinf(hi) else hi / 2 if lo <= 0 else math.sqrt(lo * hi)
    return float(p / 2 <= d <= 2 * p)


def replay_own(paths: list[str], scale_of: Any) -> dict[str, Any]:
    """Device bursts scored by own retries (`load_retry`), each file one server's bursts
    in order (one scale each, `scale_of()`), the promises as made (arms without learning:
    raw) against the same promises passed through the scale, learning from each row's
    bracketed drain once its upper end has passed. Returns pooled shares within 2x."""
    n = raw_hits = new_hits = 0.0
    for path in paths:
        with gzip.open(path, "rt") as f:
            report = json.load(f)["report"]
        scale, t0 = scale_of(), 0.0
        for burst in report["bursts"]:
            rows = sorted(burst["own_retry"]["rows"], key=lambda r: r["t_status"])
            pending: list[tuple[float, dict, float]] = []
            for r in rows:
                now = t0 + r["t_status"]
                for due_at, q, raw in [x for x in pending if x[0] <= now]:
                    pending.remove((due_at, q, raw))
                    lo, hi = own_bracket(q)
                    d = 2 * lo if math.isinf(hi) else hi / 2 if lo <= 0 else math.sqrt(lo * hi)
                    scale.observe(_group(q), d, raw, due_at)
                lo, hi = own_bracket(r)
                p = r["promised_s"] * scale.factor(_group(r), now)
                n += 1
                raw_hits += own_verdict(r["promised_s"], lo, hi)
                new_hits += own_verdict(p, lo, hi)
                if not math.isinf(hi):
                    pending.append((now + hi, r, r["promised_s"]))
            t0 += 30.0
    return {"n": n, "raw": raw_hits / n if n else None, "scaled": new_hits / n if n else None}


if __name__ == "__main__":
    main()
