"""`moska bench load` (session 16): a 429's observed drain is when a retry sent after that
429 would first have been admitted, not the first reopening of its probe. The prober goes
on until a probe sent after the burst's last 429 of its kind is admitted, and each 429 is
compared with the first admitted probe sent at or after it. A raw asyncio server on
loopback (admission shuts again after a first reopening, as under a door's backlog): well
under a second."""

from __future__ import annotations

import asyncio
import json
import time

from moska.bench.load_client import burst
from moska.bench.load_drain import (
    compare_429s,
    observed_interval,
    retry_admits_share,
    retry_admitted,
    within_2x_band,
)
from moska.bench.load_probe import DRY_ADMITTED, PROBE_HEADER

REOPEN_S = 0.15  # admission reopens for good this long after the late request's 429


def test_the_interval_is_the_first_admission_sent_after_the_429():
    series = [(0.1, False), (0.2, True), (0.3, False), (0.4, False), (0.5, True), (0.6, True)]
    # before the first reopening: as the first-open definition
    assert observed_interval(0.05, series) == (0.1 - 0.05, 0.2 - 0.05)
    # after it: the next admission, from the last refused probe after the 429
    lo, hi = observed_interval(0.25, series)
    assert (round(lo, 6), round(hi, 6)) == (0.15, 0.25)
    lo, hi = observed_interval(0.45, series)  # no refused probe in between: from the 429
    assert (lo, round(hi, 6)) == (0.0, 0.05)
    assert observed_interval(0.7, series) is None  # nothing admitted after it: left out


def test_a_retry_at_the_promise_gets_what_the_last_probe_sent_by_then_got():
    series = [(0.1, False), (0.2, True), (0.3, False), (0.4, False), (0.5, True)]
    assert retry_admitted(0.25, 0.1, series) is False  # 0.35: the 0.3 probe was refused
    assert retry_admitted(0.25, 0.2, series) is False  # 0.45: the 0.4 one too
    assert retry_admitted(0.25, 0.26, series) is True  # 0.51: past the last, admitted
    assert retry_admitted(0.05, 0.17, series) is True  # 0.22: the 0.2 one was admitted
    assert retry_admitted(0.41, 0.05, series) is None  # no probe went out in between
    rows = [{"retry_admitted": v} for v in (True, False, None, True)]
    assert retry_admits_share(rows) == 2 / 3 and retry_admits_share([]) is None


def test_compare_uses_the_series_and_keeps_the_first_open_definition_apart():
    probes = {"plain": {"prompt_chars": 40, "series": [(0.2, True), (0.3, False), (0.5, True)]}}
    rec = {"library": False, "prompt_chars": 40, "retry_after": "1", "at_door": True}
    late = [rec | {"t_status": 0.25, "retry_after_ms": "250"}]
    new = compare_429s(late, probes, {"plain": 0.2}, 0.1)
    old = compare_429s(late, probes, {"plain": 0.2}, 0.1, first_open=True)
    assert (new[0]["observed_lo_s"], new[0]["observed_hi_s"]) == (0.05, 0.25)
    assert (old[0]["observed_lo_s"], old[0]["observed_hi_s"]) == (0.0, 0.1)
    assert within_2x_band(new) == 1.0 and within_2x_band(old) == 0.0


def _server(state: dict):
    """Burst requests: a 429 after the body's `delay` (a backlog at the door). Probes: the
    first one is dry admitted (admission reopened), later ones refused (429, Retry-After 1)
    until REOPEN_S after the last burst request's 429 went out: admission shut again while
    the backlog was decided. Driven by what was sent, not by a clock from the start, so a
    slow machine that starts probing late still sees both reopenings."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        body = json.loads(await reader.readexactly(length))
        if f"{PROBE_HEADER}: 1".encode() in head:
            late = state.get("late_sent")
            again = late is not None and time.perf_counter() - late >= REOPEN_S
            retry = DRY_ADMITTED if not state.get("first_probe") or again else "1"
            state["first_probe"] = True
        else:
            await asyncio.sleep(body.get("delay", 0.0))
            retry = "1"
        writer.write(
            f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: {retry}\r\n".encode()
            + b"retry-after-ms: 300\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        await writer.drain()
        writer.close()
        if body.get("delay"):
            state["late_sent"] = time.perf_counter()

    return handle


def test_a_429_after_the_first_reopening_waits_for_the_next_one():
    async def main() -> dict:
        server = await asyncio.start_server(_server({}), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        bodies = [{"prompt": "ab", "delay": 0.0}, {"prompt": "cd", "delay": 0.35}]
        async with server:
            return await burst(
                f"http://127.0.0.1:{port}", bodies, {"plain": {"prompt": "xy"}}, 10, 0.02
            )

    out = asyncio.run(main())
    probe = out["probes"]["plain"]
    late = max(out["requests"], key=lambda r: r["t_status"])
    assert late["status"] == 429 and late["t_status"] > 0.3
    # probing went on past the first reopening, to an admission sent after the last 429
    admitted = [t for t, ok in probe["series"] if ok]
    assert min(admitted) < late["t_status"] <= max(admitted), probe["series"]
    assert any(not ok and t > min(admitted) for t, ok in probe["series"])  # shut again
    opened = {"plain": probe["t_start"]}
    rows = {r["t_status"]: r for r in compare_429s(out["requests"], out["probes"], opened, 0.02)}
    old = compare_429s(out["requests"], out["probes"], opened, 0.02, first_open=True)
    mine = rows[round(late["t_status"], 3)]
    assert mine["observed_hi_s"] >= REOPEN_S - 0.05, mine
    # the definition before scored it against the early reopening: a drain of one period
    first = {round(r["t_status"], 3): r for r in old}[round(late["t_status"], 3)]
    assert first["observed_hi_s"] == 0.02 < mine["observed_hi_s"], first
