"""The summary of `bench/device_session17_load.sh`: every `load_*.json` of a folder (one
`moska bench load` server each), per burst and per arm x burst size, with the 429s scored
by their own dry retries (load_retry: within 2x = refused at half the promise, admitted at
twice) beside the probes' score before (load_drain). Writes `summary.json` there and
prints the lines the lead sees. `python -m moska.bench.load_session17 DIR`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def _pool(groups: list[dict]) -> dict[str, Any]:
    """Scores pooled over bursts, weighted by their retried 429s."""
    n = sum(g["n"] for g in groups)
    out: dict[str, Any] = {"n": n}
    for k in ("within", "long", "short", "flicker"):
        out[k] = sum(g[k] * g["n"] for g in groups if g[k] is not None) / n if n else None
    return out


def read_reports(folder: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Each readable `load_*.json` of `folder` (one `moska bench load` server each), in
    name order: a server cut by its timeout while writing leaves a partial file, skipped."""
    for path in sorted(folder.glob("load_*.json")):
        try:
            yield path, json.loads(path.read_text())
        except ValueError as exc:
            print(f"{path.name}: unreadable ({exc})")


def summarize_dir(folder: Path) -> dict[str, Any]:
    arms: dict[str, list[dict]] = {}
    for path, data in read_reports(folder):
        args, report = data["args"], data["report"]
        arm = f"{'lib' if args['library'] != 'none' else 'plain'} learn={args['promise_learning']}"
        arm += f" lag={args['door_lag']} wait={args.get('door_wait', 'empty')}"
        arm += f" anchor={args.get('door_anchor', 'off')}"
        arm += f" early={args.get('door_early', 'off')}"
        if path.stem[-1].isdigit():  # one arm run twice (session 18): kept apart
            arm += f" run={path.stem.rsplit('_', 1)[-1]}"
        for b in report["bursts"]:
            own = b["own_retry"]
            arms.setdefault(f"{arm} {b['clients']}", []).append(
                {
                    "admitted": b["admitted"],
                    "rejected_429": b["rejected_429"],
                    "slo_met_share": b["slo_met_share"],
                    "own": own["all"],
                    "own_by_group": own["by_group"],
                    "probe_within_2x": b["retry_after_ms_within_2x_share"],
                    "promise_scale": b.get("promise_scale"),
                    "predictor_error_s_p10_p50_p90_p99": b["predictor_error_s_p10_p50_p90_p99"],
                }
            )
    summary = {}
    for key, bursts in arms.items():
        slo = [b["slo_met_share"] for b in bursts if b["slo_met_share"] is not None]
        groups = {
            g: _pool([b["own_by_group"][g] for b in bursts])
            for g in bursts[0]["own_by_group"]
            if any(b["own_by_group"][g]["n"] for b in bursts)
        }
        summary[key] = {
            "bursts": len(bursts),
            "slo_met_share_min": min(slo) if slo else None,
            "own_within_2x_pooled": _pool([b["own"] for b in bursts]),
            "own_within_2x_per_burst": [b["own"]["within"] for b in bursts],
            "probe_within_2x_per_burst": [b["probe_within_2x"] for b in bursts],
            "own_by_group_pooled": groups,
            "promise_scale_last": bursts[-1]["promise_scale"],
            "admitted": [b["admitted"] for b in bursts],
        }
    return {"bench": "load_session17_summary", "summary": summary, "bursts": arms}


def main(argv: list[str] | None = None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    out = summarize_dir(folder)
    (folder / "summary.json").write_text(json.dumps(out, indent=1))
    print(
        "arm clients: bursts | SLO min | own retries within 2x pooled (long/short/flicker)"
        " per burst | probes' score per burst | by group within(long/short) | scale"
    )
    for key, s in out["summary"].items():
        own = s["own_within_2x_pooled"]
        grp = " ".join(
            f"{g}={v['n']}:{fmt(v['within'])}({fmt(v['long'])}/{fmt(v['short'])})"
            for g, v in s["own_by_group_pooled"].items()
        )
        scale = " ".join(
            f"{g[0]}{g.split('_')[1][0]}={v['factor']}"
            for g, v in (s["promise_scale_last"] or {}).items()
        )
        print(
            f"{key:37} {s['bursts']} | {fmt(s['slo_met_share_min'])} | {fmt(own['within'])} "
            f"({fmt(own['long'])}/{fmt(own['short'])}/{fmt(own['flicker'])}) n={own['n']} "
            f"[{' '.join(fmt(x) for x in s['own_within_2x_per_burst'])}] | "
            f"[{' '.join(fmt(x) for x in s['probe_within_2x_per_burst'])}] | {grp} | {scale}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
