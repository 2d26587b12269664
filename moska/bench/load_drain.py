"""`moska bench load`: which probe's reopening each 429's promise is compared with, and the
per-429 record (promised vs observed) the report keeps.

Why more than one library probe: a library request's cost grows with its prompt (prompt
tokens x attended library tokens), and on CPU one with a long prompt cannot fit the SLO
even alone, so admission takes it only on an idle engine, while a short one is back as
soon as the queue ahead is short. One 244-character library probe (the long kind) stood
for every library 429, so a short request's promise was scored against an idle engine.
Each library 429 is now compared with the library probe nearest to it in prompt length.

Why the observed drain is an interval: the prober sends a retry every `probe_interval_s`,
so a probe admitted when sent at `t_open` says only that admission reopened after the
probe before it (sent `probe_interval_s` earlier, not admitted) and by `t_open`. A 429
that came after that earlier probe was sent has an observed drain in [0, interval]; the
point `t_open - t_status` had been floored at 1 ms and scored against, so at 1,000 clients
(CPU) plain 429s promised 0.16 s counted as 160x too long when their retry was due at
once. A promise is within 2x when [promise / 2, 2 x promise] meets the interval
(`within_2x_band`); the point ratio is kept beside it.
"""

from __future__ import annotations

from typing import Any


def probe_for(rec: dict, probes: dict[str, dict], opened: dict[str, float]) -> str | None:
    """The admitted probe a 429 `rec` is compared with: of its kind's probes (plain, or
    the library ones: `library`, `library_short`), the nearest in prompt length."""
    kind = "library" if rec["library"] else "plain"
    names = [k for k in opened if k.split("_")[0] == kind]
    if not names:
        return None
    chars = rec.get("prompt_chars")

    def distance(name: str) -> float:
        probe = probes[name].get("prompt_chars")
        if chars is None or probe is None:
            return 0.0 if name == kind else 1.0
        return abs(probe - chars)

    return min(names, key=distance)


def within_2x_band(rows: list[dict]) -> float | None:
    """The share of `compare_429s` rows whose promise, within 2x, meets the observed
    drain's interval [observed_lo_s, observed_hi_s] (None: no rows with a promise)."""
    rows = [c for c in rows if c["promised_s"] is not None]
    if not rows:
        return None
    hits = sum(
        1
        for c in rows
        if c["promised_s"] / 2 <= c["observed_hi_s"] and 2 * c["promised_s"] >= c["observed_lo_s"]
    )
    return hits / len(rows)


def within_2x(ratios: list[float]) -> float | None:
    """The share of promised / observed ratios within a factor 2 (None: no 429s)."""
    return sum(1 for x in ratios if 0.5 <= x <= 2.0) / len(ratios) if ratios else None


def library_by_probe(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Library 429s (`compare_429s` rows) by the probe they are compared with: the long
    one (the idle-only line on CPU: its prefill alone misses the SLO, so it is admitted on
    an idle engine) and the short one; per probe the count, the share of retry-after-ms
    within 2x of the observed drain, and the median promised / observed."""
    out: dict[str, dict[str, Any]] = {}
    names = {"library", "library_short"} | {c["probe"] for c in rows if c["kind"] == "library"}
    for name in sorted(names):
        mine = [c for c in rows if c["probe"] == name and c["promised_s"] is not None]
        ratios = sorted(c["promised_s"] / c["observed_s"] for c in mine)
        out[name] = {
            "n": len(ratios),
            "within_2x": within_2x_band(mine),
            "p50": ratios[len(ratios) // 2] if ratios else None,
        }
    return out


GROUPS = ("plain_door", "plain_queue", "library_door", "library_queue")


def drain_by_group(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """`compare_429s` rows by kind (plain / library) and by where the 429 was said: at the
    door (`_door`, body unread: load_shedding) or by admission (`_queue`, after reading,
    with the request's own cost). Per group: the count; the share within 2x of the
    observed drain's interval, for `retry-after-ms` (`within_2x_ms`) and for the whole
    seconds of `Retry-After` (`within_2x_header`); and the p50 of the promised and observed
    drains (s)."""

    def p50(values: list[float]) -> float | None:
        return sorted(values)[len(values) // 2] if values else None

    out: dict[str, dict[str, Any]] = {}
    for group in GROUPS:
        kind, where = group.split("_")
        mine = [c for c in rows if c["kind"] == kind and bool(c["at_door"]) == (where == "door")]
        header = [c | {"promised_s": float(c["retry_after_s"])} for c in mine]
        out[group] = {
            "n": len(mine),
            "within_2x_ms": within_2x_band(mine),
            "within_2x_header": within_2x_band(header),
            "promised_s_p50": p50([c["promised_s"] for c in mine if c["promised_s"] is not None]),
            "observed_s_p50": p50([c["observed_s"] for c in mine]),
        }
    return out


def observed_interval(t_status: float, series: list) -> tuple[float, float] | None:
    """When a retry of a 429 answered at `t_status` would first have been admitted, from
    its probe's `series` of (send time, admitted): (lo, hi] seconds after `t_status`, hi
    the first admitted probe sent at or after `t_status`, lo the last refused one sent
    before it (0: none; the 429 itself says admission was shut at `t_status`). None: no
    probe was admitted after it. Why not the probe's first reopening (before session 16):
    a 429 answered after that reopening (a request that waited in the door's backlog, or
    a longer one than the probe) was scored against a drain of [0, period], though the
    server had just refused that very request; what a client can use is when a retry sent
    after its own 429 is admitted."""
    admitted = [t for t, ok in series if ok and t >= t_status]
    if not admitted:
        return None
    first = min(admitted)
    lo = max([t for t, ok in series if not ok and t_status <= t < first], default=t_status)
    return lo - t_status, first - t_status


def retry_admitted(t_status: float, promised_s: float, series: list) -> bool | None:
    """Whether a retry sent `promised_s` after a 429 answered at `t_status` would have been
    admitted: what the last probe sent by then (and not before the 429) got; after the
    last probe (an admitted one ends the probing), admitted. None: no probe went out in
    that time (a promise shorter than the probes' period)."""
    at = t_status + promised_s
    sent = [(t, ok) for t, ok in series if t_status <= t <= at]
    if series and at > max(t for t, _ in series):
        return bool(series[-1][1])
    return max(sent)[1] if sent else None


def retry_admits_share(rows: list[dict]) -> float | None:
    """The share of `compare_429s` rows whose retry at the promise (`retry-after-ms`) would
    have been admitted (rows where that is known)."""
    known = [c["retry_admitted"] for c in rows if c.get("retry_admitted") is not None]
    return sum(known) / len(known) if known else None


def compare_429s(
    rejected: list[dict],
    probes: dict[str, dict],
    opened: dict[str, float],
    resolution_s: float = 0.0,
    first_open: bool = False,
) -> list:
    """Per 429 with a Retry-After and a probe of its kind that was admitted: its kind,
    prompt length, whether the door sent it, when it came (s from the burst's start), the
    promise (`retry-after-ms`, s; None without it), the Retry-After (s), the observed drain
    (its probe's reopening minus its arrival, s), that interval given the probes'
    period `resolution_s` (observed_lo_s, observed_hi_s) and that probe's name. With the
    probe's `series` (load_client, session 16) the interval is `observed_interval`'s (a
    429 with no admitted probe after it is left out) unless `first_open` (the definition
    before: the probe's first reopening, kept for comparison)."""
    rows: list[dict[str, Any]] = []
    for r in rejected:
        name = probe_for(r, probes, opened)
        if name is None or not (r.get("retry_after") or "").isdigit():
            continue
        ms = r.get("retry_after_ms") or ""
        series = None if first_open else probes[name].get("series")
        if series is not None:
            seen = observed_interval(r["t_status"], series)
            if seen is not None:
                row = _row(r, name, ms, seen[1], *seen)
                if row["promised_s"] is not None:
                    row["retry_admitted"] = retry_admitted(r["t_status"], row["promised_s"], series)
                rows.append(row)
            continue
        point = opened[name] - r["t_status"]
        lo = max(point - resolution_s, 0.0)
        rows.append(_row(r, name, ms, point, lo, max(point, resolution_s)))
    return rows


# library probes cut to these prompt lengths (characters) besides the full one (~244):
# a library request's drain grows with its prompt (4 s at 48 characters, 10 s at 244 at
# 1,000 clients on CPU), so with only 48 and 244 a 140-character 429 was scored against
# the 48-character reopening; more lengths bring each 429 a probe near its own size
LIBRARY_PROBE_CHARS = {"library_tiny": 16, "library_short": 48, "library_mid": 96}
LIBRARY_PROBE_CHARS |= {"library_long": 160}
# and plain ones besides the first (42 characters; session 16): on the device's idle cores
# plain queue 429s of 97-252 characters were refused while the 42-character probe was
# admitted, and were scored against its reopening (promised 0.4 s, "observed" 0-0.15 s)
PLAIN_PROBE_CHARS = {"plain_mid": 96, "plain_long": 160, "plain_full": 240}


def _cut(body: dict, chars: int) -> dict:
    text = body["prompt"] * (chars // max(len(body["prompt"]), 1) + 1)
    return body | {"prompt": text[:chars]}


def probe_bodies(make: Any, rng: Any, library: str | None) -> dict[str, dict]:
    """The probes: a plain one and one per `PLAIN_PROBE_CHARS`, and with a library the
    full-length one (`library`, about 244 characters) and one per `LIBRARY_PROBE_CHARS`
    (another body repeated and cut to N characters). `make(rng, library)` makes a body."""
    probes = {"plain": make(rng, None)}
    if library:
        probes["library"] = make(rng, library)
        for name, chars in LIBRARY_PROBE_CHARS.items():
            probes[name] = _cut(make(rng, library), chars)
    # drawn last: the probes above are the bodies of earlier rounds
    probes |= {name: _cut(make(rng, None), n) for name, n in PLAIN_PROBE_CHARS.items()}
    return probes


def _row(r: dict, name: str, ms: str, point: float, lo: float, hi: float) -> dict[str, Any]:
    return {
        "kind": "library" if r["library"] else "plain",
        "prompt_chars": r.get("prompt_chars"),
        "at_door": r.get("at_door"),
        "t_status": round(r["t_status"], 3),
        "promised_s": int(ms) / 1e3 if ms.isdigit() else None,
        "retry_after_s": int(r["retry_after"]),
        "observed_s": round(max(point, 1e-3), 3),
        "observed_lo_s": round(lo, 3),
        "observed_hi_s": round(max(hi, 1e-3), 3),
        "probe": name,
        "door_storm": r.get("door_storm"),
        # its own wait: sent to answered (a retry's wait in the loop, by regime)
        "wait_s": None if r.get("t_start") is None else round(r["t_status"] - r["t_start"], 3),
    }
