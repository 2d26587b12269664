"""`moska bench load`: one burst's figures from the client's records and the server's
(predicted, observed) TTFT pairs (`summarize`), the report's table (`table`) and its
check that nothing accepted was lost (`check`), apart from the run (load.py)."""

from __future__ import annotations

from typing import Any

from moska.bench.load_drain import (
    compare_429s,
    drain_by_group,
    library_by_probe,
    retry_admits_share,
    within_2x,
    within_2x_band,
)
from moska.bench.load_obey import check_obey
from moska.bench.load_retry import summarize_own


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


_PROBE_KEYS: tuple[str, ...] = ("probes", "status", "admitted", "dry_admitted", "t_start")
_PROBE_KEYS += ("t_status", "ttft", "error", "prompt_chars")


def _share(values: list, slo: float | None) -> float | None:
    """The share of `values` (None: not seen) within `slo`."""
    if not values:
        return None
    return sum(1 for t in values if t is not None and (slo is None or t <= slo)) / len(values)


def summarize(
    n: int,
    out: dict,
    outcomes: list[tuple[float, float]],
    slo: float | None,
    wall_s: float,
    fits_s: float | None = None,
    probe_interval_s: float = 0.0,
) -> dict:
    """One burst's figures from the client records and the server's (predicted, observed)
    TTFT pairs of the requests it admitted. `fits_s`: the predicted TTFT admission accepts
    (headroom x SLO), to tell which library 429s only the library risk factor caused.
    `probe_interval_s`: the probes' period, the resolution of an observed drain."""
    recs = out["requests"]
    admitted = [r for r in recs if r["status"] == 200]
    rejected = [r for r in recs if r["status"] == 429]
    ttft = [r["ttft"] for r in admitted if r["ttft"] is not None]
    met = sum(1 for t in ttft if slo is None or t <= slo)
    # the same, counting the client's own connect and write (its CPU is the server's too)
    full = [r["ttft"] + (r.get("connect_s") or 0.0) for r in admitted if r["ttft"] is not None]
    connect = [r["connect_s"] for r in recs if r.get("connect_s") is not None]
    # admission reopened when the first probe that was admitted was sent
    t_open = {
        kind: p["t_start"] if p.get("t_start") is not None else p["t_status"]
        for kind, p in out["probes"].items()
        if p.get("admitted") or p.get("status") == 200
    }
    # header / observed drain (the nearest probe of its kind, load_drain): Retry-After
    # (whole seconds), retry-after-ms; per kind
    # (the drain is seen to the probes' period: load_drain, within_2x_band)
    rows = compare_429s(rejected, out["probes"], t_open, probe_interval_s)
    # the definition before session 16 (each probe's first reopening), for comparison
    first_open = compare_429s(rejected, out["probes"], t_open, probe_interval_s, True)
    drains = [c["observed_s"] for c in rows]
    ratios = [c["retry_after_s"] / c["observed_s"] for c in rows]
    ms_kind: dict[str, list[float]] = {"plain": [], "library": []}
    for c in rows:
        if c["promised_s"] is not None:
            ms_kind[c["kind"]].append(c["promised_s"] / c["observed_s"])
    ms = ms_kind["plain"] + ms_kind["library"]
    kind_rows = {k: [c for c in rows if c["kind"] == k] for k in ms_kind}
    # as before there was a short library probe: every library 429 against the long one
    long = [
        c["promised_s"] / max(t_open["library"] - c["t_status"], 1e-3)
        for c in rows
        if c["kind"] == "library" and c["promised_s"] is not None and "library" in t_open
    ]
    errors = [obs - pred for pred, obs in outcomes]
    # library 429s that admission decided (the body read): their predicted TTFT, and how
    # many would have fit without the library risk factor
    lib_decided = [
        r["predicted_ttft_s"]
        for r in rejected
        if r["library"] and r.get("at_door") is False and r.get("predicted_ttft_s") is not None
    ]
    lib = [r for r in admitted if r["library"]]
    own = summarize_own(rejected)
    return {
        "clients": n,
        "admitted": len(admitted),
        "rejected_429": len(rejected),
        "failed": sum(1 for r in recs if r["error"] is not None),
        "hung": sum(1 for r in recs if r["hung"]),
        "completed": sum(1 for r in admitted if r["completed"]),
        "library_admitted": len(lib),
        "library_rejected": sum(1 for r in rejected if r["library"]),
        "slo_met_share": met / len(admitted) if admitted else None,
        "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p99_s": _pct(ttft, 0.99),
        "ttft_max_s": max(ttft) if ttft else None,
        # the first chunk with text instead (held back for an incomplete character)
        "slo_met_share_first_text": _share([r.get("ttft_text") for r in admitted], slo),
        "slo_met_share_with_connect": (
            sum(1 for t in full if slo is None or t <= slo) / len(admitted) if admitted else None
        ),
        "ttft_with_connect_p50_p99_s": [_pct(full, 0.5), _pct(full, 0.99)],
        "client_connect_s_p50_p99": [_pct(connect, 0.5), _pct(connect, 0.99)],
        "library_429_at_door": sum(1 for r in rejected if r["library"] and r.get("at_door")),
        "library_429_predicted_ttft_s_p10_p50_p90": [_pct(lib_decided, q) for q in (0.1, 0.5, 0.9)]
        if lib_decided
        else None,
        "library_429_only_for_risk": sum(1 for t in lib_decided if t <= fits_s)
        if fits_s is not None
        else None,
        "library_ttft_p50_s": _pct([r["ttft"] for r in lib if r["ttft"] is not None], 0.5),
        "rejection_s_p99": _pct([r["t_status"] for r in rejected], 0.99),
        "retry_after_s_median": _pct([int(r["retry_after"]) for r in rejected], 0.5)
        if rejected
        else None,
        "observed_drain_s_median": _pct(drains, 0.5),
        "retry_after_within_2x_share": within_2x(ratios),
        "retry_after_over_drain_p10_p50_p90": [_pct(ratios, q) for q in (0.1, 0.5, 0.9)]
        if ratios
        else None,
        # Retry-After is whole seconds (at least 1, per HTTP): retry-after-ms (OpenAI's
        # header, which its clients prefer) says the predicted drain exactly
        "retry_after_ms_median": _pct([int(r["retry_after_ms"]) for r in rejected], 0.5)
        if rejected and all((r.get("retry_after_ms") or "").isdigit() for r in rejected)
        else None,
        # the target's measure (session 17, load_retry): sampled 429s retried dry with
        # their own body at half / once / twice the promise; within 2x = refused at half,
        # admitted at twice
        "retry_after_ms_within_2x_own": own["all"]["within"],
        "own_retry": own,
        "retry_after_ms_within_2x_share": within_2x_band(rows),
        "retry_after_ms_within_2x_share_first_open": within_2x_band(first_open),
        # what a client sees: a retry sent at the promise (retry-after-ms) would be admitted
        "retry_at_promise_admitted_share": retry_admits_share(rows),
        # 429s with a Retry-After but no admitted probe of their kind after them
        "rejected_429_unresolved": sum(
            1 for r in rejected if (r.get("retry_after") or "").isdigit()
        )
        - len(rows),
        "retry_after_ms_within_2x_share_point": within_2x(ms),
        "retry_after_ms_over_drain_p10_p50_p90": [_pct(ms, q) for q in (0.1, 0.5, 0.9)]
        if ms
        else None,
        "retry_after_ms_within_2x_share_plain_library": [
            within_2x_band(kind_rows["plain"]),
            within_2x_band(kind_rows["library"]),
        ],
        "retry_after_ms_within_2x_share_plain_library_point": [
            within_2x(ms_kind["plain"]),
            within_2x(ms_kind["library"]),
        ],
        "retry_after_ms_within_2x_share_library_vs_long_probe": within_2x(long),
        "retry_after_ms_library_by_probe": library_by_probe(rows),
        # per kind and where it was said: the share within 2x (retry-after-ms and the
        # header), and the promised and observed drains (p50)
        "drain_by_group": drain_by_group(rows),
        "rejections": rows,
        "probes": {kind: {k: p.get(k) for k in _PROBE_KEYS} for kind, p in out["probes"].items()},
        "predictor_error_s_p10_p50_p90_p99": [_pct(errors, q) for q in (0.1, 0.5, 0.9, 0.99)],
        "predictor_abs_rel_error_p50_p90": [
            _pct([abs(o - p) / o for p, o in outcomes if o > 0], q) for q in (0.5, 0.9)
        ],
        "wall_s": wall_s,
    }


def groups(fig: dict) -> str:
    """A burst's 429s within 2x of the observed drain per kind and where they were said
    (`load_drain.drain_by_group`): `group n: ms / header (promised / observed p50 s)`."""

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    return "; ".join(
        f"{g} {d['n']}: {f(d['within_2x_ms'])} / {f(d['within_2x_header'])}"
        f" ({f(d['promised_s_p50'])} / {f(d['observed_s_p50'])} s)"
        for g, d in fig["drain_by_group"].items()
    )


def own_groups(fig: dict) -> str:
    """A burst's retried 429s (load_retry) per group: `group n: within / long / short`."""

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    own = fig["own_retry"]
    return "; ".join(
        f"{g} {d['n']}: {f(d['within'])} / {f(d['long'])} / {f(d['short'])}"
        for g, d in ({"all": own["all"]} | own["by_group"]).items()
        if d["n"]
    )


TABLE_KEYS = (
    "clients",
    "admitted",
    "rejected_429",
    "library_admitted",
    "library_429_only_for_risk",
    "slo_met_share",
    "ttft_p50_s",
    "ttft_p99_s",
    "retry_after_s_median",
    "observed_drain_s_median",
    "retry_after_within_2x_share",
    "retry_after_ms_within_2x_share",
    "retry_after_ms_within_2x_own",
    "predictor_error_s_p10_p50_p90_p99",
)


def table(report: dict) -> str:
    """The report's bursts as a Markdown table."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, list):
            return "/".join(fmt(x) for x in v)
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(TABLE_KEYS) + " |", "|" + " --- |" * len(TABLE_KEYS)]
    for fig in report["bursts"]:
        lines.append("| " + " | ".join(fmt(fig[k]) for k in TABLE_KEYS) + " |")
    lines.append("")
    lines.append("Retry-After within 2x of the observed drain, ms / header (promised / observed):")
    lines += [f"- {fig['clients']} clients: {groups(fig)}" for fig in report["bursts"]]
    return "\n".join(lines)


def check(report: dict) -> None:
    """AssertionError unless every admitted request completed and nothing failed or hung."""
    for fig in report["bursts"]:
        assert fig["failed"] == 0 and fig["hung"] == 0, fig
        assert fig["completed"] == fig["admitted"], fig
        assert fig["admitted"] + fig["rejected_429"] == fig["clients"], fig
        assert fig["engine_idle_after"], fig
        if "obey" in fig:  # clients that retried: every attempt accounted for (load_obey)
            check_obey(fig["obey"])


def door_state(state: object) -> dict[str, float]:
    """What the door has learnt (diagnostics): the front door's time per request inside
    (`gap_s`), the loop's time per door answer (`front_s`: the door backlog's, as the
    last request saw it), and the moving average of the wait before a decision."""
    adm = getattr(state, "admission")  # noqa: B009 (ServerState, typed loosely here)
    return {
        "gap_s": float(adm.door.gap_s),
        "front_s": float(adm.front_s),
        "elapsed_s": float(adm._elapsed),
    }
