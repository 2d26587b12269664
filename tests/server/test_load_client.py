"""`moska bench load`'s prober stops at the first admitted probe's status line and closes
the other probes still open: probes sent until its stream ended were admitted too and
kept the engine busy, so a request only an idle engine admits reopened that much later.
A raw asyncio server on loopback: well under a second."""

from __future__ import annotations

import asyncio
import json
import time

from moska.bench.load_client import _probe

STREAM_S = 1.0  # how long an admitted probe's stream lasts unless the client closes it


async def _serve(rejects: int, seen: list[str]) -> asyncio.Server:
    """429 to the first `rejects` requests, then 200 and an SSE stream of STREAM_S. `seen`
    gets each request's fate: "429", "done" (streamed to the end) or "closed" (the client
    closed it first)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        if len(seen) < rejects:
            seen.append("429")
            body = b'{"error": {"message": "overloaded"}}'
            writer.write(
                b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nretry-after-ms: 700\r\n"
                + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                + body
            )
            writer.close()
            return
        i = len(seen)
        seen.append("open")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        await writer.drain()
        try:  # the client closing the connection ends the read early
            await asyncio.wait_for(reader.read(1), STREAM_S)
            seen[i] = "closed"
        except TimeoutError:
            chunk = {"choices": [{"text": "x", "finish_reason": "length"}]}
            writer.write(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
            seen[i] = "done"
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_the_prober_stops_at_the_first_admitted_status_and_closes_the_rest():
    async def main() -> tuple[dict | None, list[str], float]:
        seen: list[str] = []
        server = await _serve(3, seen)
        port = server.sockets[0].getsockname()[1]
        rejected = asyncio.Event()
        rejected.set()
        t0 = time.perf_counter()
        async with server:
            rec = await _probe(("127.0.0.1", port), "", {"prompt": "p"}, t0, rejected, 0.02, 10.0)
            while "open" in seen:  # the server notices the closed ones
                await asyncio.sleep(0.01)
        return rec, seen, time.perf_counter() - t0

    rec, seen, wall = asyncio.run(main())
    assert rec is not None and rec["status"] == 200 and rec["ttft"] is not None
    # sending stopped at the first 200's status line, not after its 1 s stream (~50 more)
    assert seen[:3] == ["429"] * 3 and rec["probes"] < 10, (rec, seen)
    assert seen.count("done") == 1  # the first admitted one streamed to its end
    assert seen.count("closed") == len(seen) - 4  # any other admitted one was closed
    assert wall < 3 * STREAM_S


def test_ttft_is_the_first_token_even_when_its_text_is_held_back():
    """A first chunk with no text but a token (logprobs: the server holds back an
    incomplete character) ends the TTFT; the first chunk with text is kept apart, and
    the client's port is recorded (load_trace joins on it). Checked against when the
    server wrote the text chunk, not against a fixed gap: a stall before the first chunk
    was read pushed the TTFT past a 0.3 s gap."""
    from moska.bench.load_client import one

    gap_s = 0.05
    text_written: list[float] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        held = {"text": "", "finish_reason": None, "logprobs": {"tokens": ["\\xe2"]}}
        writer.write(b"data: " + json.dumps({"choices": [held]}).encode() + b"\n\n")
        await writer.drain()
        await asyncio.sleep(gap_s)
        # the client's read of the first chunk came in before this timer (one event loop:
        # ready sockets are served before due timers), so it ran before this
        text_written.append(time.perf_counter())
        done = {"text": "\u2014", "finish_reason": "length", "logprobs": {"tokens": ["x"]}}
        writer.write(b"data: " + json.dumps({"choices": [done]}).encode() + b"\n\n")
        writer.write(b"data: [DONE]\n\n")
        writer.close()

    async def main() -> tuple[dict, float]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            body = {"prompt": "p", "logprobs": 0}
            t0 = time.perf_counter()
            return await one(("127.0.0.1", port), "", body, t0, 10), t0

    rec, t0 = asyncio.run(main())
    assert rec["completed"] and rec["error"] is None, rec
    sent = t0 + rec["t_start"] + rec["connect_s"]  # TTFTs count from here
    # the first token was read before the text chunk was written, the text after it
    assert sent + rec["ttft"] < text_written[0] <= sent + rec["ttft_text"], (rec, text_written)
    assert isinstance(rec["port"], int) and rec["port"] > 0


def test_a_probe_is_sent_marked_and_a_dry_admission_ends_the_probing():
    """Probes carry the bench's probe header; the bench's server answers one admission
    admits with a 429 whose Retry-After is 0 (load_probe: not run), which ends the
    probing like a 200, while a real 429 (Retry-After >= 1) does not."""
    from moska.bench.load_probe import DRY_ADMITTED, PROBE_HEADER

    marked: list[bool] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        marked.append(f"{PROBE_HEADER}: 1".encode() in head)
        retry = DRY_ADMITTED if len(marked) > 2 else "1"
        writer.write(
            f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: {retry}\r\n".encode()
            + b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        writer.close()

    async def main() -> dict | None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        rejected = asyncio.Event()
        rejected.set()
        async with server:
            return await _probe(
                ("127.0.0.1", port), "", {"prompt": "p"}, time.perf_counter(), rejected, 0.02, 10
            )

    rec = asyncio.run(main())
    assert rec is not None and rec["admitted"] and rec["dry_admitted"], rec
    assert rec["status"] == 429 and rec["probes"] >= 3
    assert marked and all(marked)
