"""How well can any promise do on kept `moska bench load` bursts? The own-retry score's
ceiling, offline (CPU, seconds): each burst's admission map, read from every dry retry it
sent, against the recorded promises and against a hindsight promise that knows when
admission reopened for each request's kind and length in that very burst.

Why: #15.4 asks for `retry-after-ms` within 2x of the drain for >= 95 % of 429s, and the best
predictor so far scores 0.71 (session 17). Before another predictor, the question is whether
any promise made per 429 from its kind, prompt length and time can: the drain of a 429 at
`t` is `T - t`, where `T` is when a retry of that request would first be admitted.

The map. Every sampled 429 was retried dry at half, once and twice its promise
(`load_retry`), so a burst holds ~300 (time, kind, prompt length, admitted?) points. For a
request of kind `k` and prompt length `L` the reopening `T` lies between the last refusal
before the first admission and that first admission, among the burst's points of kind `k`
(plain: all of them; library: prompt lengths within `band` characters). A promise `P` of a
429 at `t` is then within 2x (D / 2 <= P <= 2 D with D = T - t) for *every* `T` in that
bracket (`sure`) or for *some* `T` in it (`maybe`): the true score lies between the two.
Checked on the recorded promises, whose true own-retry score is known: it must fall in the
bracket (`recorded_own` between `recorded_sure` and `recorded_maybe`).

The hindsight promise is `T` (the bracket's middle) less `t`: it knows the burst's future.
No causal predictor can beat it by more than the bracket's width; where it is under 0.95,
the target is out of reach for any promise per 429 on these bursts.

`python -m moska.bench.load_drain_ceiling [--band 15] [--out X.json] [STEM ...]` (default:
session 17's device calls).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from moska.bench.common import environment
from moska.bench.load_door_replay import RESULTS, read_result

DEFAULT = "load_bursts_device_cpu_session17_call*_learn_*.json.gz"


def points(rows: list[dict]) -> list[tuple[float, str, int, bool]]:
    """(time sent from the burst's start, kind, prompt chars, admitted) of every answered
    dry retry of a burst's own-retry rows."""
    out = []
    for row in rows:
        for sent, ok in row["retries"].values():
            if ok is not None:
                out.append((row["t_status"] + sent, row["kind"], row["prompt_chars"] or 0, ok))
    return out


def bracket(pts: list, kind: str, chars: int, band: int) -> tuple[float, float]:
    """When admission reopened for a request of `kind` and `chars` (library: the points
    within `band` characters): (last refusal before the first admission, that admission);
    (last refusal, inf) if none was admitted."""
    near = [p for p in pts if p[1] == kind and (kind == "plain" or abs(p[2] - chars) <= band)]
    admitted = [p[0] for p in near if p[3]]
    first = min(admitted) if admitted else math.inf
    refused = [p[0] for p in near if not p[3] and p[0] < first]
    return (max(refused) if refused else 0.0), first


def judge(promise: float, t: float, lo: float, hi: float) -> tuple[bool, bool]:
    """(within 2x for every reopening in [lo, hi], for some), a 429 at `t`."""
    if not hi > t:
        return False, False
    d_lo, d_hi = max(lo - t, 0.0), hi - t
    sure = d_lo > 0 and d_hi / 2 <= promise <= 2 * d_lo
    maybe = d_lo / 2 <= promise <= 2 * d_hi
    return sure, maybe


def burst_rows(burst: dict, band: int) -> list[dict]:
    """One row per scored 429: group, its own verdict, and the bracket's judgement of the
    recorded promise and of the hindsight one."""
    rows = [r for r in burst["own_retry"]["rows"] if r["verdict"] is not None]
    pts = points(rows)
    out = []
    for r in rows:
        t, promise = r["t_status"], r["promised_s"]
        lo, hi = bracket(pts, r["kind"], r["prompt_chars"] or 0, band)
        hindsight = max((lo + hi) / 2 - t, 0.001) if math.isfinite(hi) else promise
        out.append(
            {
                "group": f"{burst['clients']} {r['kind']} {'door' if r['at_door'] else 'queue'}",
                "own": r["verdict"] == "within",
                "recorded": judge(promise, t, lo, hi),
                "hindsight": judge(hindsight, t, lo, hi),
            }
        )
    return out


def shares(rows: list[dict]) -> dict[str, Any]:
    n = len(rows)

    def share(f: Any) -> float | None:
        return round(sum(1 for r in rows if f(r)) / n, 3) if n else None

    return {
        "n": n,
        "recorded_own": share(lambda r: r["own"]),
        "recorded_sure": share(lambda r: r["recorded"][0]),
        "recorded_maybe": share(lambda r: r["recorded"][1]),
        "hindsight_sure": share(lambda r: r["hindsight"][0]),
        "hindsight_maybe": share(lambda r: r["hindsight"][1]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stems", nargs="*", help="kept result stems (default: session 17's)")
    ap.add_argument("--band", type=int, default=15, help="library prompt chars either side")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    stems = args.stems or sorted(p.name[: -len(".json.gz")] for p in RESULTS.glob(DEFAULT))
    runs, every = {}, []
    for stem in stems:
        rows: list[dict] = []
        for burst in read_result(stem)["report"]["bursts"]:
            rows += burst_rows(burst, args.band)
        groups = sorted({r["group"] for r in rows}, key=lambda g: (int(g.split()[0]), g))
        runs[stem] = {
            "all": shares(rows),
            "by_group": {g: shares([r for r in rows if r["group"] == g]) for g in groups},
        }
        every += rows
    groups = sorted({r["group"] for r in every}, key=lambda g: (int(g.split()[0]), g))
    summary: dict[str, Any] = {
        "all": shares(every),
        "by_group": {g: shares([r for r in every if r["group"] == g]) for g in groups},
        "runs": len(runs),
    }
    out = {
        "bench": "load_drain_ceiling",
        "args": vars(args),
        "runs": runs,
        "summary": summary,
        "environment": environment(argv),
    }
    for stem, run in runs.items():
        print(stem, json.dumps(run["all"]))
    for g, s in summary["by_group"].items():
        print(f"{g:>22}", json.dumps(s))
    print("ALL", json.dumps(summary["all"]))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
