"""The client side of `moska bench load`: one burst of streaming completions sent at once,
and a prober that measures when the server admits again after its first 429.

It runs in its own process (`burst_in_process`), so parsing a thousand SSE streams does
not compete with the server for one interpreter's GIL: the server's TTFT is then the
server's, not the benchmark's. Times are seconds from the burst's start.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

from moska.bench import load_obey
from moska.bench.load_probe import DRY_ADMITTED, PROBE_HEADER
from moska.bench.load_retry import own_retries, promise_s, sample_every


def _record(body: dict) -> dict[str, Any]:
    return {
        "library": body.get("library") is not None,
        "prompt_chars": len(body.get("prompt", "")),
        "t_start": None,  # when it was sent (seconds from the burst's start)
        "status": None,  # HTTP status
        "t_status": None,  # when the status line arrived
        "ttft": None,  # first token, from when the request was written (client side)
        "ttft_text": None,  # first chunk with text (the bench's TTFT before session 13)
        "connect_s": None,  # opening the connection and writing the request
        "latency": None,
        "retry_after": None,  # the 429's Retry-After header (whole seconds)
        "retry_after_ms": None,  # the 429's retry-after-ms header (OpenAI's, milliseconds)
        "predicted_ttft_s": None,  # the 429's predicted TTFT (from its message)
        "at_door": None,  # the 429 came from the door, before the body was read
        "door_storm": None,  # its [connections ahead, their time (s), loop lag (s)]
        # a probe admission would have admitted, answered without running it (load_probe)
        "dry_admitted": False,
        "completed": False,  # finish_reason and [DONE] seen
        "tokens": 0,
        "error": None,
        "hung": False,
        "port": None,  # the client's local port (joins the server's trace, load_trace)
    }


_PREDICTED = re.compile(rb"predicted time to first token ([0-9.]+)s")
# a door 429's view of the burst (load_shedding): connections ahead, their time, loop lag
_STORM = re.compile(rb"(\d+) connections ahead ([0-9.]+)s, loop lag ([0-9.]+)s")


async def one(
    client: Any,
    url: str,
    body: dict,
    t0: float,
    timeout_s: float,
    on_status: Callable[[dict], None] | None = None,
    probe: bool = False,
) -> dict:
    """Send one streaming completion; what happened, timed from `t0` (`on_status(record)`
    once its status and headers are in, before the stream is read). `client` is the
    server's (host, port): the request goes over a raw asyncio connection (HTTP/1.1,
    written once, SSE lines read as they come), so that a thousand of them cost the load
    generator milliseconds, not the seconds an HTTP client library spends, which would
    count into every TTFT. TTFT counts from when the request was written to the socket:
    under a 1,000-client burst this process spent up to 0.9 s opening its own connections
    on the cores it shares with the server (`connect_s`, reported apart). It ends at the
    first chunk with text, a token (logprobs) or a finish: the first token, when the body
    asks for logprobs (`load.make_body` does). `probe`: sent with `load_probe.PROBE_HEADER`
    (the bench's server answers it without running it: `dry_admitted`)."""
    rec = _record(body)
    host, port = client
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        + (f"{PROBE_HEADER}: 1\r\n" if probe else "")
        + "Connection: close\r\n\r\n"
    ).encode()
    start = time.perf_counter()
    rec["t_start"] = start - t0
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            rec["port"] = writer.get_extra_info("sockname")[1]
            writer.write(head + payload)
            await writer.drain()
            sent = time.perf_counter()
            rec["connect_s"] = sent - start
            status_line = await reader.readline()
            status = int(status_line.split()[1])
            rec["status"], rec["t_status"] = status, time.perf_counter() - t0
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode("latin-1").partition(":")
                headers[key.strip().lower()] = value.strip()
            if status == 429:
                rec["retry_after"] = headers.get("retry-after")
                rec["retry_after_ms"] = headers.get("retry-after-ms")
                rec["dry_admitted"] = probe and rec["retry_after"] == DRY_ADMITTED
            if on_status is not None:
                on_status(rec)
            if status != 200:
                text = await reader.read()
                if status == 429:
                    rec["at_door"] = b"overloaded at the door" in text
                    if m := _PREDICTED.search(text):
                        rec["predicted_ttft_s"] = float(m.group(1))
                    if m := _STORM.search(text):
                        rec["door_storm"] = [int(m.group(1)), float(m.group(2)), float(m.group(3))]
                else:
                    rec["error"] = f"{status}: {text[:200]!r}"
                return rec
            finish, done = None, False
            while line := await reader.readline():  # chunk sizes, SSE lines, blanks
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec["error"] = str(chunk["error"])[:200]
                    break
                if chunk.get("usage"):
                    rec["tokens"] = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    # a token whose text is held back (an incomplete UTF-8 character: 40%
                    # of the tiny random model's first tokens) still comes, with its
                    # logprobs, when the body asks for them
                    token = (choice.get("logprobs") or {}).get("tokens")
                    if rec["ttft"] is None and (choice["text"] or token or choice["finish_reason"]):
                        rec["ttft"] = time.perf_counter() - sent
                    if rec["ttft_text"] is None and (choice["text"] or choice["finish_reason"]):
                        rec["ttft_text"] = time.perf_counter() - sent
                    finish = choice["finish_reason"] or finish
            rec["completed"] = done and finish is not None
            rec["latency"] = time.perf_counter() - start
            if not rec["completed"] and rec["error"] is None:
                rec["error"] = f"stream ended without finish/[DONE] ({finish}, {done})"
    except TimeoutError:
        rec["hung"] = True
    except Exception as exc:  # noqa: BLE001 - counted and reported
        rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if writer is not None:
            writer.close()
    return rec


async def _probe(
    client: Any,
    url: str,
    body: dict,
    t0: float,
    rejected: asyncio.Event,
    interval_s: float,
    timeout_s: float,
    until: Callable[[], float | None] | None = None,
) -> dict | None:
    """After the burst's first 429, send `body` every `interval_s` (not waiting for the
    answers: under a burst an answer takes seconds, which is the door's latency, not the
    drain) until one is admitted. Returns the admitted probe sent first (with `probes`:
    how many were sent); its `t_start` is when a retry was first admitted.

    It stops at the first 200's status line and closes the other probes still open (the
    server aborts them): it stopped when the first admitted probe's stream had ended, and
    until then (5-11 s on CPU) each probe sent was admitted too, so the engine served
    dozens of probes, and a library request that only an idle engine admits was admitted
    that much later (the long library probe reopened 16-23 s after the burst). Probes go
    with `load_probe.PROBE_HEADER`: the bench's server answers one that admission admits
    with a 429 whose Retry-After is 0 (`dry_admitted`) and does not run it, so an admitted
    library probe's prefill (seconds on CPU) does not delay the other probes' reopenings
    (on session 13's runs a 96-character library probe reopened after a 160- and a
    244-character one, behind their prefills). Returns the record with `admitted`.

    `until` (session 16): probing goes on until a probe sent at or after `until()` (the
    last 429 of its kind, None while the burst is still being answered) is admitted, so
    that every 429 has a reopening after it (`load_drain.observed_interval`); every
    answered probe's (send time, admitted) is in the record's `series`. Without it the
    first admission ends the probing, as before: a 429 answered after it (the door's
    backlog; up to 437 of 956 in a session-14 run) was scored against a reopening that
    came before its own rejection."""
    await rejected.wait()
    tasks: list[asyncio.Task] = []
    admitted = asyncio.Event()
    first: list[asyncio.Task] = []  # the probe whose 200 came first: kept to its end
    series: list[tuple[float, bool]] = []

    def status(rec: dict) -> None:
        task = asyncio.current_task()
        ok = rec["status"] == 200 or rec["dry_admitted"]
        series.append((round(rec["t_start"], 4), bool(ok)))
        if until is not None and ok:
            last = until()
            ok = last is not None and rec["t_start"] >= last
        if ok and not admitted.is_set() and task is not None:
            admitted.set()
            first.append(task)

    async def send() -> dict:
        return await one(client, url, body, t0, timeout_s, status, probe=True)

    deadline = time.perf_counter() + timeout_s
    while not admitted.is_set() and time.perf_counter() < deadline:
        tasks.append(asyncio.create_task(send()))
        try:
            await asyncio.wait_for(admitted.wait(), interval_s)
        except TimeoutError:
            pass
    for task in tasks:
        if task not in first:
            task.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    records = [r for r in done if isinstance(r, dict)]
    ok = [r for r in records if r["status"] == 200 or r["dry_admitted"]]
    seen = {"probes": len(tasks), "series": sorted(series)}
    if not ok:
        return seen | {"status": None, "admitted": False, "error": "never admitted"}
    return min(ok, key=lambda r: r["t_start"]) | seen | {"admitted": True}


async def burst(
    url: str,
    bodies: list[dict],
    probes: dict,
    timeout_s: float,
    probe_interval_s: float,
    own_retry: bool = True,
    obey: int = 0,
) -> dict:
    """Send every body at once; returns {"requests": records, "probes": {kind: record},
    "wall_s"}. `probes`: bodies per kind ("plain", "library", "library_short": what
    precedes "_" is the kind); each prober starts at its kind's first 429 (a library
    request waits longer than a plain one). `own_retry`: every k-th 429 of each kind
    (`load_retry.sample_every`) is retried dry with its own body at half, once and twice
    its promise (`own_retries` in its record: the drain #15.4 means, load_retry).
    `obey` > 0: each client retries its 429s for real, up to `obey` times, after each
    promise (load_obey: `attempts` in its record), and a sampled 429 only dry at half."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    server = (parts.hostname, parts.port)
    rejected = {"plain": asyncio.Event(), "library": asyncio.Event()}
    last_429 = {"plain": 0.0, "library": 0.0}  # the latest 429 of each kind (t_status)
    answered = asyncio.Event()  # every request of the burst has its status
    t0 = time.perf_counter()

    every = sample_every(len(bodies)) if own_retry else 0
    count = {"plain": 0, "library": 0}  # 429s of each kind so far (every k-th is retried)
    sampler = load_obey.Sampler(sample_every(len(bodies)) if own_retry else 0)

    async def send(body: dict) -> dict:
        rec = await one(server, url, body, t0, timeout_s, on_status=_seen)
        if obey:  # real retries after each promise, like the OpenAI SDK (load_obey)
            real = lambda: one(server, url, body, t0, timeout_s)
            dry = lambda: one(server, url, body, t0, timeout_s, probe=True)
            return await load_obey.obey(rec, obey, t0, real, dry, sampler)
        if every and rec["status"] == 429 and promise_s(rec) is not None:
            kind = "library" if rec["library"] else "plain"
            count[kind] += 1
            if count[kind] % every == 0:  # its own dry retries (load_retry: the drain)
                again = lambda: one(server, url, body, t0, timeout_s, probe=True)
                rec["own_retries"] = await own_retries(rec, t0, again)
        return rec

    def _seen(rec: dict) -> None:
        if rec["status"] == 429:
            kind = "library" if rec["library"] else "plain"
            rejected[kind].set()
            last_429[kind] = max(last_429[kind], rec["t_status"])
        statuses.append(1)
        if len(statuses) == len(bodies):
            answered.set()

    statuses: list[int] = []

    def until(kind: str) -> Callable[[], float | None]:
        return lambda: last_429[kind] if answered.is_set() else None

    probers = {
        kind: asyncio.create_task(
            _probe(
                server,
                url,
                body,
                t0,
                rejected[kind.split("_")[0]],
                probe_interval_s,
                timeout_s,
                until(kind.split("_")[0]),
            )
        )
        for kind, body in probes.items()
    }
    records = await asyncio.gather(*(send(b) for b in bodies))
    answered.set()  # (also those that never got a status)
    results = {}
    for kind, task in probers.items():
        if rejected[kind.split("_")[0]].is_set():
            results[kind] = await task
        else:
            task.cancel()
    # t0 on the machine's monotonic clock (the server's time.monotonic() on Linux), so
    # client times can be set against the server's
    return {"requests": records, "probes": results, "wall_s": time.perf_counter() - t0, "t0": t0}


def burst_sync(
    url: str,
    bodies: list[dict],
    probe: dict[str, dict],
    timeout_s: float,
    probe_interval_s: float,
    own_retry: bool = True,
    obey: int = 0,
) -> dict:
    return asyncio.run(burst(url, bodies, probe, timeout_s, probe_interval_s, own_retry, obey))


def burst_in_process(pool: Any, *args: Any) -> dict:
    """`burst_sync(*args)` in `pool` (a one-process executor), or here if pool is None."""
    if pool is None:
        return burst_sync(*args)
    return pool.submit(burst_sync, *args).result()
