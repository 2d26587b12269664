"""Replays recorded `moska bench load --trace` bursts through the door's count of requests
admitted ahead of a 429's retry, old (`retry_drain.door_admits`: all that fit, decided at
once) and new (`burst_admits`: admission's decisions at the loop's pace while the step in
progress runs starved), and the drain each gives a long library request (one whose
prefill alone misses the SLO: it is admitted on an idle engine, so its drain is the
engine's idle time after the queue counted ahead). Why: the box these were measured on
was quiet (load ~1) and the box now is not (load 8-10: steps run 2-9x their fit, and
admitted requests miss the SLO in both arms), so a live A/B cannot tell the two counts
apart; the recorded bursts can, against what admission really took and when a library
probe was really admitted.

Per burst it takes the trace's state at one 429 (a door 429 or one decided in the queue):
the requests inside, the engine's queue, how long the step in progress had run, the
slowdown factor and the time inside, with the step fit the run learned in its warm-up.
`python -m moska.bench.load_door_replay --out X.json` (the session-14 bursts by default).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from pathlib import Path
from typing import Any

from moska.bench.common import environment
from moska.server.admission import AdmissionController, EngineLimits, Load, RequestCost
from moska.server.burst_admits import Backlog, burst_admits
from moska.server.retry_drain import door_admits, with_door
from moska.server.step_model import StepModel

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
# (file stem, time of the 429 in the burst, at the door or in the queue)
CASES = (
    ("load_bursts_cpu_library_session14_final_1000", 0.40, "door"),
    ("load_bursts_cpu_library_session14_quiet2_1000", 0.45, "door"),
    ("load_bursts_cpu_library_session14_quiet2_300", 0.40, "door"),
    ("load_bursts_cpu_library_session14_spike_a_1000", 0.50, "door"),
    ("load_bursts_cpu_library_session14_doormix_300", 0.45, "door"),
    ("load_bursts_cpu_library_session14_doormix2_1000", 0.82, "queue"),
    ("load_bursts_cpu_library_session14_spike_1000", 0.95, "queue"),
)
TYPICAL = RequestCost(143, 16)  # the bursts' admitted plain request (2,852 tokens / 20)
LONG_LIBRARY = RequestCost(160, 16, 2048)  # 160 characters, 8 chunks of 256 attended


def replay_case(report: dict, at: float, kind: str, gap_s: float, shares: list[float]) -> dict:
    """The old and new counts (and the long library request's drain each gives) at the
    trace's record nearest `at` s into the burst."""
    burst = report["bursts"][0]
    trace = burst["trace"]
    first = trace["steps"][0]
    started = first["t"] - first["s"]  # the burst's first step
    records = trace["sheds"] if kind == "door" else trace["decisions_rejected"]
    rec = min(records, key=lambda r: abs(r["t"] - at))
    waiting = rec["waiting"]
    busy = max(0.0, rec["t"] - started) if waiting else 0.0
    load = Load((TYPICAL,) * waiting, (), max(0, waiting - 1), busy)
    adm = AdmissionController(5.0, None, limits=EngineLimits(4096, 256))
    adm.model = StepModel(prior=tuple(report["step_model_after_warmup"]))
    adm.slow.log_mean = math.log(rec["slowdown"])
    fits, stall, plain = adm.fits_s(), rec["elapsed_s"], rec["inside"] // 2  # half plain

    def drain(n: int) -> float:
        pred = adm.predict(LONG_LIBRARY, with_door(load, TYPICAL, n), 1, None, False)
        return round(float(pred.idle_s + max(0.0, busy - pred.first_s)), 3)

    old = door_admits(adm.predict, TYPICAL, load, plain, fits - stall)
    backlog = Backlog(rec["inside"], gap_s, stall)
    new = {
        str(s): burst_admits(adm.predict, TYPICAL, load, plain, backlog, fits, 1.0, s)
        for s in shares
    }
    probes = ("library_long", "library")
    seen = sorted(
        r["observed_s"]
        for r in burst["rejections"]
        if r["kind"] == "library" and r["probe"] in probes and r["at_door"] == (kind == "door")
    )
    observed = seen[len(seen) // 2] if seen else None
    return {
        "kind": kind,
        "t_s": rec["t"],
        "inside": rec["inside"],
        "waiting": waiting,
        "admitted_in_burst": burst["admitted"],
        "count_old": old,
        "count_new_by_engine_share": new,
        "drain_old_s": drain(old),
        "drain_new_s_by_engine_share": {s: drain(n) for s, n in new.items()},
        "observed_long_library_drain_s_p50": observed,
    }


def read_result(stem: str) -> dict[str, Any]:
    """A kept result by its stem: results over ~300 KB are kept gzipped (`.json.gz`)."""
    plain = RESULTS / f"{stem}.json"
    if plain.exists():
        return dict(json.loads(plain.read_text()))
    with gzip.open(RESULTS / f"{stem}.json.gz", "rt") as f:
        return dict(json.load(f))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gap", type=float, default=0.003, help="s per decision (~2.8 ms seen)")
    ap.add_argument("--shares", default="0.1,0.2,0.4", help="engine shares to replay with")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shares = [float(s) for s in args.shares.split(",")]
    cases = {}
    for stem, at, kind in CASES:
        report = read_result(stem)["report"]
        cases[stem] = replay_case(report, at, kind, args.gap, shares)
    share = str(shares[0])

    def off(promise: float, observed: float | None) -> float | None:
        """How many times off a promise is (>= 1 either way), None without a drain seen."""
        return None if not observed else round(max(promise / observed, observed / promise), 2)

    seen = [c["observed_long_library_drain_s_p50"] for c in cases.values()]
    old = [off(c["drain_old_s"], o) for c, o in zip(cases.values(), seen, strict=True)]
    new = [
        off(c["drain_new_s_by_engine_share"][share], o)
        for c, o in zip(cases.values(), seen, strict=True)
    ]
    out = {
        "bench": "load_door_replay",
        "args": vars(args),
        "cases": cases,
        "summary": {
            "times_off_old": old,
            f"times_off_new_share_{share}": new,
            "within_2x_old": sum(1 for x in old if x is not None and x <= 2),
            f"within_2x_new_share_{share}": sum(1 for x in new if x is not None and x <= 2),
            "cases": len(cases),
        },
        "environment": environment(),
    }
    for stem, c in cases.items():
        print(stem, json.dumps({k: v for k, v in c.items() if k != "kind"}))
    print(json.dumps(out["summary"]))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
