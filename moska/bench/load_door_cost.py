"""What one 429 costs the server's event loop, by where it is said: `python -m
moska.bench.load_door_cost [--requests N] [--concurrency C] [--out X.json]`.

Why: at a burst of 1,000 streaming clients (CPU, `moska bench load`) no request past the
door was decided for 2 s while the loop answered ~950 door 429s. A request inside the door
needs several loop iterations (body, validation, tokenization, admission), and each
iteration first answers every 429 whose connection became readable, so the stall is the
burst's count times what one 429 costs the loop. This bench sends `--requests` requests,
`--concurrency` at a time, each on its own connection (`Connection: close`, as the load
bench's clients do), from another process, and reads the CPU time of the server's loop
thread (`time.pthread_getcpuclockid`: CPU seconds, so a box loaded by others moves it less
than wall time). Variants, each on a fresh uvicorn (uvloop and httptools as `moska serve`):

- `bare`: a pure ASGI app answering a fixed 429 (uvicorn's own floor per connection);
- `door`: moska's app with admission shedding every request at the door
  (load_shedding, before the body is parsed);
- `route`: the door open and admission rejecting in the route (FastAPI routing, body read,
  pydantic, tokenization, then the 429);
- `admitted`: the door open and admission admitting: each request streams 16 tokens as the
  load bench's do (what a booked retry admitted at its moment costs the loop, against a
  door 429: `server/admission_bookings.py` spaces booked moments by a multiple of that).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from moska.server.admission import AdmissionController, Decision, Load, RequestCost, Verdict

VARIANTS = ("bare", "door", "route", "admitted")
_BODY = {"prompt": "hello there, how are you today?", "max_tokens": 4}
# as the load bench's (load.make_body): streamed, 16 tokens, each token's chunk sent
_STREAM = {"max_tokens": 16, "stream": True, "ignore_eos": True, "logprobs": 0}


class _Rejecting(AdmissionController):
    """Admission that rejects everything, at the door (`at_door`) or in the route."""

    def __init__(self, at_door: bool) -> None:
        super().__init__(5.0, None)
        self.at_door = at_door
        self._no = Decision(Verdict.SLO, 9.0, 2, 1.5, library_drain_s=4.0)

    def shed(self, load: Load, elapsed_s: float = 0.0) -> Decision | None:
        return self._no if self.at_door else None

    def decide(
        self,
        new: RequestCost | int,
        load: Load,
        num_requests: int = 1,
        elapsed_s: float = 0.0,
        key: bytes | None = None,
    ) -> Decision:
        self.door.leave_current()
        return self._no


async def _bare(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b'{"error":{"message":"overloaded","type":"rate_limit","code":"ttft_slo"}}'
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"2")]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _client(
    port: int, n: int, concurrency: int, model: str, stream: bool = False
) -> dict[str, Any]:
    """Sends `n` completions (`stream`: as the load bench's), `concurrency` at a time;
    status counts and wall time."""

    async def one(payload: bytes, counts: dict[int, int]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        await writer.drain()
        data = await reader.read()
        writer.close()
        status = int(data.split(b" ", 2)[1]) if data else 0
        counts[status] = counts.get(status, 0) + 1

    async def main() -> dict[str, Any]:
        body = json.dumps(_BODY | {"model": model} | (_STREAM if stream else {})).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        counts: dict[int, int] = {}
        sem = asyncio.Semaphore(concurrency)

        async def gated() -> None:
            async with sem:
                await one(head + body, counts)

        t0 = time.perf_counter()
        await asyncio.gather(*(gated() for _ in range(n)))
        return {"status": counts, "client_wall_s": time.perf_counter() - t0}

    return asyncio.run(main())


def _loop_cpu_s() -> float:
    """CPU seconds of the uvicorn thread (background_server names it)."""
    for t in threading.enumerate():
        if t.name == "moska-uvicorn" and t.ident is not None:
            return time.clock_gettime(time.pthread_getcpuclockid(t.ident))
    raise RuntimeError("no uvicorn thread")


def measure(variant: str, engine: Any, n: int, concurrency: int, pool: Any) -> dict[str, Any]:
    from moska.server.app import create_app
    from moska.server.background import background_server
    from moska.server.settings import ServerSettings

    app: Any = _bare
    model = "m"
    stream = variant == "admitted"
    if stream:  # admission off: every request runs
        app = create_app(engine, ServerSettings(ttft_slo=None))
        model = app.state.moska.model_name
    elif variant != "bare":
        settings = ServerSettings(ttft_slo=5.0)
        app = create_app(engine, settings, admission=_Rejecting(variant == "door"))
        model = app.state.moska.model_name
    with background_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        warm = min(50, n)
        pool.submit(_client, port, warm, concurrency, model, stream).result()  # warm both
        cpu0, t0 = _loop_cpu_s(), time.perf_counter()
        out = pool.submit(_client, port, n, concurrency, model, stream).result()
        cpu, wall = _loop_cpu_s() - cpu0, time.perf_counter() - t0
    return {
        "variant": variant,
        "requests": n,
        "concurrency": concurrency,
        "status": out["status"],
        "loop_cpu_s": round(cpu, 4),
        "loop_cpu_us_per_request": round(cpu / n * 1e6, 1),
        "wall_s": round(wall, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moska.bench.load_door_cost", description=__doc__)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--label", default="", help="e.g. 'loaded box (load 10)'")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from moska.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_model(None, device="cpu")
    rows = []
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        for variant in args.variants.split(","):
            rows.append(measure(variant, engine, args.requests, args.concurrency, pool))
            print(json.dumps(rows[-1]), flush=True)
    per = {r["variant"]: r["loop_cpu_us_per_request"] for r in rows}
    summary: dict[str, Any] = {"loop_cpu_us_per_429": per, "label": args.label}
    if "admitted" in per and "door" in per:  # an admitted stream, in door 429s (None: the
        # door's loop CPU read 0 at the clock's resolution, as once in CI-like -n 2 runs)
        door = per["door"]
        summary["admitted_over_door"] = round(per["admitted"] / door, 2) if door else None
    if args.out is not None:
        from moska.bench.common import environment

        record = {
            "bench": "load_door_cost",
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": rows,
            "summary": summary,
            "environment": environment(argv),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
