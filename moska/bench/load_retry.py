"""`moska bench load`: each sampled 429 scored by dry retries of its own body, sent at half,
once and twice its promise (session 17): the drain the issue means, tested directly.

What #15.4 asks: `Retry-After` is the predicted drain, within 2x, where the drain of a 429
is the time until a retry of *that request* would be admitted. With D that time and P the
promise (`retry-after-ms`), within 2x is D / 2 <= P <= 2 D, i.e. D <= 2 P (a retry sent
at 2 P is admitted) and D >= P / 2 (a retry sent at P / 2 is not yet admitted). Where
admission stays open once it has reopened for a request (it does while nothing new
arrives ahead of it), those two retries decide the question exactly: no probe period, no
other request standing in for this one.

Why the probes were not that drain (load_drain, sessions 12-16): each 429 was compared
with the reopening of a periodic probe of its kind and nearest prompt length. (1) A
library request's wait grows with its prompt, and the nearest probe can be 40 characters
away: in session 15's quiet 1,000 burst the 48- and the 96-character library probes
reopened at 5.3 s and 11.6 s, so a 72-character 429 was scored against either, 2x apart.
(2) The probes' 0.25 s period bounds what a sub-second plain drain can be scored against
(`within_2x_band` took any point of the interval). Both are kept, for continuity, beside
this score; this one is the target's measure.

The retries go with `load_probe.PROBE_HEADER`: the bench's server decides them as any
request (the door's shed, then admission) and answers one admission admits with a dry
429 (`DRY_ADMITTED`), so they add a decision each and no engine work. Only every k-th
429 is retried (`sample_every`: about `target` per burst), so a 1,000-client burst adds
~300 decisions over its drain, not 3,000.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from moska.bench.load_drain import GROUPS

# (name, multiple of the promise) of each dry retry of a sampled 429
POINTS: tuple[tuple[str, float], ...] = (("half", 0.5), ("at", 1.0), ("double", 2.0))


def sample_every(clients: int, target: int = 100) -> int:
    """Retry every k-th 429 of each kind: about `target` 429s of a burst of `clients`."""
    return max(1, math.ceil(clients / max(1, target)))


def promise_s(rec: dict) -> float | None:
    """A 429's promise (`retry-after-ms`, s), None without one (or a dry probe's 429)."""
    ms = rec.get("retry_after_ms") or ""
    return int(ms) / 1e3 if ms.isdigit() and not rec.get("dry_admitted") else None


async def own_retries(
    rec: dict, t0: float, send: Callable[[], Awaitable[dict]]
) -> dict[str, Any] | None:
    """Send the 429 `rec`'s body again (`send`: a dry probe of it) at each of `POINTS` x its
    promise after its status came (`t_status`, s from `t0` on perf_counter); per point
    [sent at (s after the 429), admitted (None: no answer)]. None without a promise."""
    p = promise_s(rec)
    if p is None or rec.get("t_status") is None:
        return None

    async def at(f: float) -> list:
        delay = t0 + rec["t_status"] + f * p - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        r = await send()
        ok = None if r["status"] is None else bool(r["status"] == 200 or r["dry_admitted"])
        return [round(r["t_start"] - rec["t_status"], 4), ok]

    got = await asyncio.gather(*(at(f) for _, f in POINTS))
    return {name: g for (name, _), g in zip(POINTS, got, strict=True)}


def verdict(retries: dict[str, Any] | None) -> str | None:
    """`within` (refused at half the promise, admitted at twice it), `long` (admitted at
    half: the drain is under half the promise), `short` (refused at twice: over twice the
    promise), `flicker` (admitted at half, refused at twice: reopened and shut again); None
    when a retry got no answer."""
    if not retries:
        return None
    half, double = retries["half"][1], retries["double"][1]
    if half is None or double is None:
        return None
    if half and not double:
        return "flicker"
    return "long" if half else "within" if double else "short"


def score(rows: list[dict]) -> dict[str, Any]:
    """Shares of the rows (each with `verdict` and `at_promise`: the retry at the promise
    admitted) by verdict, and of retries at the promise admitted; `n` scored rows."""
    scored = [r for r in rows if r["verdict"] is not None]
    out: dict[str, Any] = {"n": len(scored)}
    for v in ("within", "long", "short", "flicker"):
        out[v] = sum(1 for r in scored if r["verdict"] == v) / len(scored) if scored else None
    at = [r["at_promise"] for r in rows if r["at_promise"] is not None]
    out["admitted_at_promise"] = sum(at) / len(at) if at else None
    return out


def own_retry_rows(rejected: list[dict]) -> list[dict]:
    """One row per retried 429: kind, at the door or not, prompt length, the promise, when
    it came (s from the burst's start), the retries and their verdict."""
    rows = []
    for r in rejected:
        retries = r.get("own_retries")
        if not retries:
            continue
        rows.append(
            {
                "kind": "library" if r["library"] else "plain",
                "at_door": bool(r.get("at_door")),
                "prompt_chars": r.get("prompt_chars"),
                "t_status": round(r["t_status"], 3),
                "promised_s": promise_s(r),
                "retries": retries,
                "verdict": verdict(retries),
                "at_promise": retries["at"][1],
            }
        )
    return rows


def summarize_own(rejected: list[dict]) -> dict[str, Any]:
    """The burst's own-retry score: over all retried 429s and by group (kind x place,
    `load_drain.GROUPS`), and the rows."""
    rows = own_retry_rows(rejected)
    groups = {}
    for g in GROUPS:
        kind, where = g.split("_")
        groups[g] = score(
            [r for r in rows if r["kind"] == kind and r["at_door"] == (where == "door")]
        )
    return {"all": score(rows), "by_group": groups, "rows": rows}
