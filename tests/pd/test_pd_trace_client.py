"""#19, session 15: the trace client's own lag stays out of the TTFT it reports. On 2 H200s
at 60-100 req/s the client, building each ~4K-token prompt in its send loop and sharing a
process with the front ends, sent requests up to 0.9-2 s late and read TTFT p50 0.5-0.9 s
where the P/D front end saw 0.15-0.19 s. Now the bodies are built before the replay and it
runs in a process of its own (`ClientProcess`), on the front ends' clock."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from moska.bench import trace_client
from moska.bench.trace_client import ClientProcess, replay
from moska.server.background import background_server

BUILD_S = 0.05  # what building one prompt takes in the slow-builder test


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def complete() -> StreamingResponse:
        async def events():
            for k in range(3):
                choice = {"index": 0, "text": " t", "finish_reason": "length" if k == 2 else None}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': 3}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


ROWS = [{"timestamp": 10 * i, "input_length": 64, "output_length": 3, "hash_ids": [i]}
        for i in range(6)]  # fmt: skip
ARGS = argparse.Namespace(speedup=1.0, block_tokens=16, max_output=3, request_timeout=30)


def test_prompts_are_built_before_the_replay(monkeypatch):
    built: list[float] = []  # when each prompt was done

    def slow_prompt(row, block_tokens):
        time.sleep(BUILD_S)
        built.append(time.monotonic())
        return [10 + row["hash_ids"][0]] * 4

    monkeypatch.setattr(trace_client, "prompt_of", slow_prompt)
    with background_server(_app()) as url:
        results, _ = asyncio.run(replay(url, ROWS, ARGS))
    assert all(r.status == 200 and r.tokens == 3 and r.events == 3 for r in results)
    # every prompt was built before the replay's clock started (its first send time):
    # built in the send loop (the old client), the 6th went out ~0.25 s after its time.
    # Not a bound on send_lag_s: a loaded machine is that late without any build.
    assert len(built) == len(ROWS) and max(built) <= min(r.arrival for r in results)


def test_client_process_replays_on_the_front_ends_clock():
    client = ClientProcess()
    try:
        with background_server(_app()) as url:
            before = time.monotonic()
            results, wall = client.replay(url, ROWS, ARGS)
            after = time.monotonic()
    finally:
        client.close()
    assert [r.status for r in results] == [200] * len(ROWS)
    # the child's arrivals on this process's monotonic clock (the decisions' `t`)
    assert before <= results[0].arrival <= results[-1].arrival <= after
    assert results[-1].arrival - results[0].arrival >= 0.05 - 1e-3 and wall < after - before
