"""`moska bench load --obey-retries N`: clients that obey `retry-after-ms` and retry, as the
OpenAI SDK's do (session 19, issue #15.4).

With N = 0 (the default) no client retries after a 429 and the drain is scored only with
dry retries (load_retry). With N > 0 every client whose request gets a 429 with a
`retry-after-ms` sleeps that long, counted from when its 429's status line arrived, and
sends the SAME body again as a real request (no probe header), up to N times: the OpenAI
SDK's loop (`max_retries=2` by default; it honours a server's delay up to 120 s in the
installed openai 3.x and does not retry past it: `over_sdk_limit` counts the clients that
got such a promise, which are still obeyed here). Each request's record keeps its `attempts`.

The server books a refused request for its promised time (retry bookings): a retry of the
same body at or after its promise claims the booking. So in this mode a sampled 429 is
retried dry only at HALF its promise (`load_probe.PROBE_HEADER`: decided, never run, and a
dry retry never claims a booking); the retry at the promise is the client's real one. Per
sampled 429 the verdict is `within` (dry half refused AND the real retry at the promise
admitted), `long` (dry half admitted), `short` (half refused, real retry refused), `flicker`
(half admitted, real retry refused), None (a retry got no answer).

Times are seconds from the burst's start on perf_counter, as in load_client.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from moska.bench.load_retry import promise_s

SDK_MAX_RETRY_AFTER_S = 120.0  # openai 3.x: MAX_RETRY_AFTER_DELAY (60 s in openai 1.x)
VERDICTS = ("within", "long", "short", "flicker")
KINDS = ("plain", "library")
EPS_S = 1e-6  # float rounding of times taken apart from t0 (a retry is never this early)
_ATTEMPT_KEYS: tuple[str, ...] = ("t_start", "t_status", "status", "retry_after_ms", "ttft")
_ATTEMPT_KEYS += ("completed", "error", "hung", "at_door")

Send = Callable[[], Awaitable[dict]]


class Sampler:
    """Every k-th 429 of each kind (plain / library) that a real retry follows is sampled."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.count = {"plain": 0, "library": 0}

    def __call__(self, rec: dict) -> bool:
        kind = "library" if rec["library"] else "plain"
        self.count[kind] += 1
        return self.every > 0 and self.count[kind] % self.every == 0


def attempt(rec: dict) -> dict[str, Any]:
    """One attempt's row, `admitted`: its status was 200."""
    return {k: rec.get(k) for k in _ATTEMPT_KEYS} | {"admitted": rec.get("status") == 200}


async def _until(deadline: float) -> None:
    """Sleep until perf_counter() >= deadline (never wakes early: the loop's clock may)."""
    while (left := deadline - time.perf_counter()) > 0:
        await asyncio.sleep(left)


async def _dry_at(deadline: float, send: Send) -> dict:
    await _until(deadline)
    return await send()


def verdict(half: bool | None, at: bool | None) -> str | None:
    """The sampled 429's verdict from its dry half (admitted?) and its real retry at the
    promise (admitted?); None when either got no answer."""
    if half is None or at is None:
        return None
    if half:
        return "long" if at else "flicker"
    return "within" if at else "short"


async def obey(
    first: dict, n: int, t0: float, send_real: Send, send_dry: Send, sample: Sampler
) -> dict:
    """Retry the request whose first attempt is `first` (load_client.one's record) up to
    `n` times, each after its 429's promise; returns `first` with `attempts` (one row per
    attempt, `attempt`, the first included) and `obey_samples` (the sampled 429s: which
    attempt, its promise, [dry half sent after the 429 (s), admitted], [real retry sent
    after the 429 (s), admitted], verdict)."""
    rows, samples = [attempt(first)], []
    last = first
    while len(rows) <= n and last["status"] == 429 and last.get("t_status") is not None:
        p = promise_s(last)
        if p is None:
            break
        t429 = t0 + last["t_status"]
        half = asyncio.create_task(_dry_at(t429 + p / 2, send_dry)) if sample(last) else None
        await _until(t429 + p)
        last = await send_real()
        rows.append(attempt(last))
        if half is not None:
            dry = await half
            ok = None if dry["status"] is None else dry["status"] == 200 or dry["dry_admitted"]
            at = None if last["status"] is None else last["status"] == 200
            samples.append(
                {
                    "attempt": len(rows) - 2,  # the index of the sampled 429's attempt
                    "kind": "library" if first["library"] else "plain",
                    "at_door": rows[-2]["at_door"],
                    "promised_s": p,
                    "half": [dry["t_start"] - rows[-2]["t_status"], ok],
                    "at": [last["t_start"] - rows[-2]["t_status"], at],
                    "verdict": verdict(ok, at),
                }
            )
    return first | {"attempts": rows, "obey_samples": samples}


def _ok(ttft: float | None, slo: float | None) -> bool:
    return ttft is not None and (slo is None or ttft <= slo)


def counts(recs: list[dict], slo: float | None, n: int) -> dict[str, int]:
    """The burst's counts (what the shares are made of; `overall` sums them)."""
    names: tuple[str, ...] = (
        "clients",
        "clients_429",
        "admitted_first_attempt",
        "admitted_first_retry",
        "admitted_on_retry",
        "never_admitted",
        "retries_sent",
        "retry_429",
        "retry_admitted_slo_met",
        "admitted_all",
        "admitted_all_slo_met",
        "completed_all",
        "failed_or_hung_attempts",
        "early_retries",
        "exhausted",
        "over_sdk_limit",
        "sampled",
    )
    c = dict.fromkeys(names + tuple(f"sampled_{v}" for v in VERDICTS), 0)
    for r in recs:
        rows = r.get("attempts") or [attempt(r)]
        c["clients"] += 1
        c["clients_429"] += rows[0]["status"] == 429
        c["retries_sent"] += len(rows) - 1
        c["retry_429"] += sum(1 for a in rows[1:] if a["status"] == 429)
        c["failed_or_hung_attempts"] += sum(1 for a in rows if a["error"] or a["hung"])
        # the SDK would have raised its RateLimitError at the first such 429, not retried
        c["over_sdk_limit"] += any((promise_s(a) or 0.0) > SDK_MAX_RETRY_AFTER_S for a in rows)
        for prev, a in itertools.pairwise(rows):
            due = prev["t_status"] + (promise_s(prev) or 0.0) - EPS_S
            c["early_retries"] += a["t_start"] < due
        for v in (s["verdict"] for s in r.get("obey_samples", [])):
            c["sampled"] += v is not None
            if v is not None:
                c[f"sampled_{v}"] += 1
        won = [i for i, a in enumerate(rows) if a["admitted"]]
        if not won:
            c["never_admitted"] += 1
            c["exhausted"] += len(rows) == n + 1
            continue
        i, a = won[0], rows[won[0]]
        c["admitted_all"] += 1
        c["admitted_all_slo_met"] += _ok(a["ttft"], slo)
        c["completed_all"] += bool(a["completed"])
        if i == 0:
            c["admitted_first_attempt"] += 1
            continue
        c["admitted_on_retry"] += 1
        c["admitted_first_retry"] += i == 1
        c["retry_admitted_slo_met"] += _ok(a["ttft"], slo)
    return c


def shares(c: dict[str, int]) -> dict[str, Any]:
    """The report's figures from `counts`: the counts and the shares the issue asks for."""

    def share(num: int, den: int) -> float | None:
        return num / den if den else None

    s: dict[str, Any] = dict(c)
    s["admitted_first_retry_share"] = share(c["admitted_first_retry"], c["clients_429"])
    s["admitted_within_n_share"] = share(c["admitted_on_retry"], c["clients_429"])
    s["retry_admitted_slo_share"] = share(c["retry_admitted_slo_met"], c["admitted_on_retry"])
    s["slo_share_all_admitted"] = share(c["admitted_all_slo_met"], c["admitted_all"])
    for v in VERDICTS:
        s[f"sampled_{v}_share"] = share(c[f"sampled_{v}"], c["sampled"])
    return s


def summarize_obey(recs: list[dict], slo: float | None, n: int) -> dict[str, Any]:
    """One burst's obeying-clients figures, and the attempts of each client that got a 429:
    [[t_start, t_status, status, retry_after_ms, admitted], ...] per client, by kind (plain,
    library). `by_kind`: the figures of plain and library clients apart."""
    out = shares(counts(recs, slo, n))
    out["retries"] = n
    kinds = {k: [r for r in recs if bool(r["library"]) == (k == "library")] for k in KINDS}
    out["by_kind"] = {k: shares(counts(kinds[k], slo, n)) for k in KINDS}
    out["samples"] = [s for r in recs for s in r.get("obey_samples", [])]
    out["attempts_429_clients"] = {
        k: [
            [
                [a["t_start"], a["t_status"], a["status"], a["retry_after_ms"], a["admitted"]]
                for a in rows
            ]
            for r in kinds[k]
            if (rows := r.get("attempts")) and rows[0]["status"] == 429
        ]
        for k in KINDS
    }
    return out


def overall(figs: list[dict]) -> dict[str, Any]:
    """The bursts' obey figures together: summed counts, shares recomputed."""
    keys = counts([], None, 0).keys()
    out = shares({k: sum(f[k] for f in figs) for k in keys})
    out["by_kind"] = {
        kind: shares({k: sum(f["by_kind"][kind][k] for f in figs) for k in keys}) for kind in KINDS
    }
    return out


def check_obey(fig: dict) -> None:
    """AssertionError unless every client is accounted for: admitted (first attempt or a
    retry, and completed) or never admitted after its last allowed 429; no attempt failed or
    hung; no retry went before its promise."""
    assert fig["admitted_all"] + fig["never_admitted"] == fig["clients"], fig
    assert fig["admitted_first_attempt"] + fig["admitted_on_retry"] == fig["admitted_all"], fig
    assert fig["completed_all"] == fig["admitted_all"], fig
    assert fig["failed_or_hung_attempts"] == 0 and fig["early_retries"] == 0, fig
    assert fig["admitted_on_retry"] + fig["never_admitted"] == fig["clients_429"], fig


OBEY_KEYS = (
    "clients_429",
    "admitted_first_retry_share",
    "admitted_within_n_share",
    "retry_admitted_slo_share",
    "slo_share_all_admitted",
    "never_admitted",
    "sampled",
    "sampled_within_share",
)


def obey_table(report: dict) -> str:
    """The obey figures per burst and overall as a Markdown table ("" without them)."""
    figs = [(str(f["clients"]), f["obey"]) for f in report["bursts"] if "obey" in f]
    if not figs:
        return ""

    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else "-" if v is None else str(v)

    lines = ["| clients | " + " | ".join(OBEY_KEYS) + " |", "|" + " --- |" * (1 + len(OBEY_KEYS))]
    if "obey_overall" in report:
        every = report["obey_overall"]
        figs += [("all", every)] + [(f"all {k}", every["by_kind"][k]) for k in KINDS]
    lines += ["| " + " | ".join([name] + [fmt(o[k]) for k in OBEY_KEYS]) + " |" for name, o in figs]
    return "\n".join(lines)


def obey_line(o: dict) -> str:
    """One line of a burst's obey figures for the log."""

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    return (
        f"{o['clients_429']} got a 429; admitted on the first retry {f(o['admitted_first_retry_share'])}"
        f", within {o['retries']} {f(o['admitted_within_n_share'])}; SLO met after a retry "
        f"{f(o['retry_admitted_slo_share'])}, all admitted {f(o['slo_share_all_admitted'])}; "
        f"never admitted {o['never_admitted']}; sampled {o['sampled']}, within "
        f"{f(o['sampled_within_share'])}"
    )
