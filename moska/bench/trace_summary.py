"""What a trace replay reports per system (`moska bench trace`): the client's view of each
request (`Result`) and the summary over a replay: goodput, SLO shares, percentiles and,
for P/D, how the front end's admission predictions compared with what the client saw."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Result:
    status: int
    ttft_s: float | None = None
    tpot_s: float | None = None
    tokens: int = 0
    error: str | None = None
    predicted: tuple[float, ...] | None = None  # the front end's (TTFT s, TPOT s, batch)
    arrival: float = 0.0  # when it was sent (time.monotonic(), the front end's clock too)
    events: int = 0  # stream events that carried output (text)
    send_lag_s: float = 0.0  # sent this late after its time (the client's own lag)

    @property
    def unmeasured(self) -> bool:
        """Completed, several tokens, but all in one event: its `ttft_s` is the last token's
        time and it has no TPOT (`tpot_s` None). A model without a tokenizer streams so (no
        text until the end): the 2-GPU trace read TPOT 0.0 and TTFT = the whole request."""
        return self.status == 200 and self.tpot_s is None


def _timings(r: Result) -> tuple[float, float]:
    """(TTFT, TPOT) of a completed request: `_one` sets both whenever the status is 200."""
    assert r.ttft_s is not None and r.tpot_s is not None, r
    return r.ttft_s, r.tpot_s


def summarize(results: list[Result], wall_s: float, ttft_slo: float, tpot_slo: float) -> dict:
    """A replay's figures. A request whose tokens all came in one event (`unmeasured`)
    counts as completed and `unmeasured`, never as within an SLO, and stays out of the
    percentiles: its first token's and per-token times were not seen."""
    done = [r for r in results if r.status == 200]
    ok = [r for r in done if not r.unmeasured]
    rejected = sum(1 for r in results if r.status == 429)
    failed = len(results) - len(done) - rejected
    timed = [_timings(r) for r in ok]  # (TTFT, TPOT) of each completed request
    good = [t for t in timed if t[0] <= ttft_slo and t[1] <= tpot_slo]
    admitted = len(results) - rejected

    def pct(xs, q):
        return round(float(np.percentile(xs, q)), 4) if xs else None

    ttfts, tpots = [t[0] for t in timed], [t[1] for t in timed]
    return {
        "requests": len(results),
        "completed": len(done),
        "unmeasured": len(done) - len(ok),
        "rejected_429": rejected,
        "failed": failed,
        "errors": sorted({r.error for r in results if r.error and r.status != 429})[:5],
        "goodput_rps": round(len(good) / wall_s, 4),
        "within_both_slos_of_admitted": round(len(good) / admitted, 4) if admitted else None,
        "within_ttft_slo_of_all": round(
            sum(1 for ttft, _ in timed if ttft <= ttft_slo) / len(results), 4
        ),
        "ttft_p50_s": pct(ttfts, 50),
        "ttft_p99_s": pct(ttfts, 99),
        "tpot_p50_s": pct(tpots, 50),
        "tpot_p99_s": pct(tpots, 99),
        "wall_s": round(wall_s, 2),
        # how late the client sent them (its own lag, counted in their TTFT)
        "send_lag_p99_s": pct([r.send_lag_s for r in results], 99),
        **prediction_errors(ok, ttft_slo, tpot_slo),
    }


def prediction_errors(ok: list[Result], ttft_slo: float, tpot_slo: float) -> dict:
    """How the front end's admission predictions compared with what the client saw (P/D
    only): observed / predicted ratios and, of the admitted requests that missed an SLO,
    how many were predicted to meet it."""
    rows = [(r, r.predicted) for r in ok if r.predicted]
    if not rows:
        return {}
    ttft_ratio = [_timings(r)[0] / max(p[0], 1e-6) for r, p in rows]
    tpot_ratio = [_timings(r)[1] / max(p[1], 1e-6) for r, p in rows]
    return {
        "prediction": {
            "ttft_observed_over_predicted_p50": round(float(np.median(ttft_ratio)), 3),
            "ttft_observed_over_predicted_p90": round(float(np.percentile(ttft_ratio, 90)), 3),
            "tpot_observed_over_predicted_p50": round(float(np.median(tpot_ratio)), 3),
            "tpot_observed_over_predicted_p90": round(float(np.percentile(tpot_ratio, 90)), 3),
            "missed_ttft": sum(1 for r, _ in rows if _timings(r)[0] > ttft_slo),
            "missed_tpot": sum(1 for r, _ in rows if _timings(r)[1] > tpot_slo),
            # per request: TTFT, TPOT, predicted TTFT, predicted TPOT, predicted decode batch
            "requests": [[round(_timings(r)[0], 4), round(_timings(r)[1], 4), *p] for r, p in rows],
        }
    }


def stage_accuracy(stats: list[dict]) -> dict | None:
    """P/D: the front end's predicted stage (admission -> KV at the decode instance) over
    the one it then saw, over the admitted requests of `stats`' decision logs (p10, p50,
    p90, count); None when none was admitted (a 2-GPU run: 1.5-2 s predicted for stages
    the colocated instances' TTFTs put at ~0.15 s, nothing admitted to compare with)."""
    ratios = [
        d["stage_s"] / d["observed_stage_s"]
        for s in stats
        for d in s.get("decisions", [])
        if d.get("decision") == "admit" and d.get("observed_stage_s") and "stage_s" in d
    ]
    if not ratios:
        return None
    q = np.quantile(ratios, [0.1, 0.5, 0.9])
    return {"p10": round(float(q[0]), 3), "p50": round(float(q[1]), 3),
            "p90": round(float(q[2]), 3), "n": len(ratios)}  # fmt: skip
