"""The summary of `bench/device_session20_load.sh`: every `load_*.json` of a folder (one
`moska bench load` server each, retry bookings on or off, clients obeying retry-after-ms or
not). Per server: the SLO share of everything admitted, and either the obeying clients'
figures by kind (load_obey: admitted on the first retry, within N, never admitted, sampled
within 2x) or the dry own-retry score (load_retry). Pools them per arm, writes
`summary.json` there and prints the lines the lead sees.
`python -m moska.bench.load_session20 DIR`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from moska.bench.load_obey import KINDS, overall
from moska.bench.load_session17 import fmt as _f
from moska.bench.load_session17 import read_reports


def _slo(bursts: list[dict]) -> tuple[int, float | None]:
    """Admitted on first attempts and their SLO share, over the bursts."""
    n = sum(b["admitted"] for b in bursts)
    met = sum(b["admitted"] * (b["slo_met_share"] or 0.0) for b in bursts)
    return n, (met / n if n else None)


def _dry(bursts: list[dict]) -> dict[str, Any]:
    """The own-retry score pooled over bursts, weighted by their scored 429s."""
    rows = [b["own_retry"]["all"] for b in bursts if b.get("own_retry")]
    n = sum(r["n"] for r in rows)
    within = sum(r["within"] * r["n"] for r in rows if r["within"] is not None)
    return {"n": n, "within": within / n if n else None}


def summarize_dir(folder: Path) -> dict[str, Any]:
    servers: list[dict[str, Any]] = []
    for path, data in read_reports(folder):
        args, bursts = data["args"], data["report"]["bursts"]
        obey = int(args.get("obey_retries") or 0)
        row: dict[str, Any] = {
            "file": path.name,
            "bookings": args.get("bookings", "on"),
            "obey_retries": obey,
            "device": args.get("device", "cpu"),
            "bursts": [b["clients"] for b in bursts],
        }
        row["first_attempt_admitted"], row["first_attempt_slo"] = _slo(bursts)
        if obey:
            row["obey"] = overall([b["obey"] for b in bursts if "obey" in b])
            row["obey_by_size"] = {
                str(size): overall(
                    [b["obey"] for b in bursts if b["clients"] == size and "obey" in b]
                )
                for size in sorted({b["clients"] for b in bursts})
            }
        else:
            row["dry"] = _dry(bursts)
            row["dry_by_size"] = {
                str(size): _dry([b for b in bursts if b["clients"] == size])
                for size in sorted({b["clients"] for b in bursts})
            }
        servers.append(row)
    return {"servers": servers}


def _obey_line(o: dict) -> str:
    parts = [
        (
            f"{o['clients_429']} with a 429: 1st retry {_f(o['admitted_first_retry_share'])}, "
            f"within N {_f(o['admitted_within_n_share'])}, never {o['never_admitted']}, "
            f"SLO all admitted {_f(o['slo_share_all_admitted'])}, sampled within 2x "
            f"{_f(o['sampled_within_share'])} ({o['sampled']})"
        )
    ]
    for kind in KINDS:
        k = o["by_kind"][kind]
        parts.append(
            f"{kind}: {k['clients_429']} / {_f(k['admitted_first_retry_share'])} / "
            f"{_f(k['admitted_within_n_share'])} / never {k['never_admitted']} / "
            f"sampled {_f(k['sampled_within_share'])} ({k['sampled']})"
        )
    return "; ".join(parts)


def main(argv: list[str]) -> int:
    folder = Path(argv[0])
    summary = summarize_dir(folder)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    for s in summary["servers"]:
        head = (
            f"{s['file']}: bookings={s['bookings']} obey={s['obey_retries']} on "
            f"{s['device']}, bursts {s['bursts']}; first attempts admitted "
            f"{s['first_attempt_admitted']}, SLO "
            f"{_f(s['first_attempt_slo'])}"
        )
        print(head)
        if "obey" in s:
            print("  all: " + _obey_line(s["obey"]))
            for size, o in s["obey_by_size"].items():
                print(f"  {size}: " + _obey_line(o))
        else:
            by = ", ".join(
                f"{k}: {_f(v['within'])} ({v['n']})" for k, v in s["dry_by_size"].items()
            )
            print(f"  dry own-retry within 2x {_f(s['dry']['within'])} ({s['dry']['n']}); {by}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
