"""The trace replay's client (`moska bench trace`): prompts built from a row's hash ids,
each request sent at its time and timed from its stream's token events, in a process of
its own (`ClientProcess`).

Why a process of its own: the systems' front ends run in the bench's process (threads), and
on 2 H200s at 60-100 req/s a client in that process too (building each ~4K-token prompt
and its JSON in the send loop, then parsing every token event of every stream) sent
requests up to 0.9-2 s behind their times (front-end decisions p90 0.27 s after the
scheduled send at 60 req/s) and read TTFT p50 0.48-0.86 s where the P/D front end saw
0.15-0.19 s from admission to first token (#19, session 15): the client's lag, counted as
the systems' TTFT. Now the prompts and bodies are built before the replay starts, and the
client shares no interpreter lock with the front ends. `Result.send_lag_s` keeps what lag
is left visible."""

from __future__ import annotations

import asyncio
import functools
import json
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor

from moska.bench.trace_summary import Result

BLOCK = 512  # tokens per hash id in Mooncake traces
SERVED = "moska-tiny"  # the model id every instance serves (whatever its checkpoint)
TOKEN_RANGE = (10, 250)  # ids every moska model's vocabulary has (the tiny one: 256 bytes)


def prompt_of(row: dict, block_tokens: int) -> list[int]:
    """Token ids for a row: block i's tokens come from hash id i's own generator."""
    n = max(1, round(row["input_length"] * block_tokens / BLOCK))
    out: list[int] = []
    for h in row["hash_ids"]:
        out += _block(int(h), block_tokens)
        if len(out) >= n:
            break
    return out[:n]


@functools.lru_cache(maxsize=4096)
def _block(h: int, block_tokens: int) -> tuple[int, ...]:
    """Hash id `h`'s tokens (shared prefixes recur: each is drawn once)."""
    rng = random.Random(h * 7919 + 17)
    return tuple(rng.randrange(*TOKEN_RANGE) for _ in range(block_tokens))


def request_body(prompt: list[int], max_tokens: int) -> bytes:
    """A streamed completion request's JSON (usage included: it counts the tokens). It asks
    for `logprobs: 0` so that every token is an event (`moska bench load` does the same):
    the tiny model's byte tokens are often incomplete UTF-8, whose text the server holds
    back until a character completes, so the first event came 1-10 decode steps after the
    first token (the P/D front end learnt those as first-token times, 0.2-0.6 s where
    0.05 s was predicted on the CPU bench, and its TTFT spread grew with them)."""
    body = {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": 0,
            "stream_options": {"include_usage": True}}  # fmt: skip
    return json.dumps(body).encode()


async def _one(client, url: str, body: bytes, arrival: float) -> Result:
    import httpx

    lag = time.monotonic() - arrival  # sent this late after its time
    times: list[float] = []  # when each event with choices came
    tokens = 0
    headers = {"content-type": "application/json"}
    try:
        async with client.stream(
            "POST", f"{url}/v1/completions", content=body, headers=headers
        ) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(r.status_code, error=r.text[:200], arrival=arrival, send_lag_s=lag)
            pred = r.headers.get("x-moska-pd-predicted")
            predicted = tuple(float(x) for x in pred.split(",")) if pred else None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(500, error=str(chunk["error"])[:200])
                if chunk.get("choices"):
                    times.append(time.monotonic())
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
    except httpx.HTTPError as exc:
        return Result(599, error=f"{type(exc).__name__}: {exc}"[:200], arrival=arrival)
    if not times:
        return Result(500, error="no tokens", arrival=arrival)
    tokens = tokens or len(times)
    # several tokens in one event: no per-token times to read (`Result.unmeasured`)
    tpot = None if tokens > 1 and len(times) < 2 else 0.0
    if tpot is not None and tokens > 1:
        tpot = (times[-1] - times[0]) / (tokens - 1)
    return Result(200, times[0] - arrival, tpot, tokens, predicted=predicted, arrival=arrival,
                  events=len(times), send_lag_s=lag)  # fmt: skip


async def replay(url: str, rows: list[dict], args) -> tuple[list[Result], float]:
    """Send every row at its time (divided by the speedup); all results and the wall time.
    Every body is built before the first is sent: not in the send loop's time."""
    import httpx

    bodies = [
        request_body(prompt_of(row, args.block_tokens),
                     max(1, min(args.max_output, int(row["output_length"]))))
        for row in rows
    ]  # fmt: skip
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        t0 = time.monotonic()
        tasks = []
        for row, body in zip(rows, bodies, strict=True):
            at = t0 + row["timestamp"] / 1000 / args.speedup
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            tasks.append(asyncio.create_task(_one(client, url, body, at)))
        results = await asyncio.gather(*tasks)
        return list(results), time.monotonic() - t0


def _ready() -> bool:
    import httpx  # noqa: F401

    return True


def _replay_here(url: str, rows: list[dict], args: dict) -> tuple[list[Result], float]:
    import argparse

    return asyncio.run(replay(url, rows, argparse.Namespace(**args)))


class ClientProcess:
    """One process that runs every measured replay (started once: a spawn costs ~1-2 s of
    imports). Its clock is the front ends' (time.monotonic() is system-wide on Linux), so
    `Result.arrival` still matches the front end's decision times."""

    def __init__(self) -> None:
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self._pool.submit(_ready).result()  # started (and imported) before the first replay

    def replay(self, url: str, rows: list[dict], args) -> tuple[list[Result], float]:
        return self._pool.submit(_replay_here, url, rows, dict(vars(args))).result()

    def close(self) -> None:
        self._pool.shutdown()
