"""The stream relay: a decode instance's SSE answer passed to the client as it comes.

While it relays, it is what the global scheduler learns from a stream: the first token's
time (the TTFT model's decode side), each event's lateness (what is late in flight) and the
tokens per event and per second (the TPOT factor, `pd/token_times.py`). It also releases the
decode instance's hold on the transferred blocks once the request holds them (the first
chunk), and ends the stream with an error event as soon as the instance dies. The front end
(`pd/frontend.py`) calls it from its proxy for a streamed 200.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx

from moska.pd.instance_death import DeathWatch, InstanceDied
from moska.pd.scheduler import Instance, Plan
from moska.pd.token_times import TokenTimes, finishes, strip_usage

if TYPE_CHECKING:
    from moska.pd.frontend import FrontEnd


def first_token(
    front: FrontEnd, plan: Plan, inst: Instance, seconds: float, record: dict | None
) -> None:
    """Count a stream's first token: the front end's stats, the scheduler, the decision log."""
    front.stats.first_token_s += seconds
    front._sched.observe_first(plan, inst, seconds, time.monotonic())
    if record is not None:
        record["observed_first_s"] = round(seconds, 4)


async def relay(
    front: FrontEnd,
    inst: Instance,
    resp: httpx.Response,
    plan: Plan | None,
    tid: int | None,
    sent_at: float,
    strip: bool,
    record: dict | None = None,
) -> AsyncIterator[bytes]:
    """Yield `resp`'s raw SSE chunks (the usage chunk dropped when `strip`: the front end
    asked for it only to count tokens), observing them for the scheduler when `plan`."""
    watch, first = DeathWatch(front._dead[inst.name]), True
    held: float | None = None  # the first event's time while it may be the last token's
    chunks = resp.aiter_raw()
    tokens = TokenTimes()
    inst.decoding += 1
    try:
        while True:
            try:
                chunk = await watch.wait(chunks.__anext__())
            except StopAsyncIteration:
                break
            if first and tid is not None:  # the request holds its blocks now
                asyncio.create_task(front._release(inst, tid))
            if first and plan is not None:  # the first token, unless it is the last of
                held = time.monotonic() - sent_at  # several in one event (`finishes`)
                if not finishes(chunk):
                    first_token(front, plan, inst, held, record)
                    held = None
            first = False
            if plan is not None:  # an event's predicted time: the step times its tokens
                step = front._sched.tpot_s(inst.decoding, inst)
                step *= front._sched.tokens_per_event(inst)
                events = tokens.events
                window = tokens.add(chunk, step)
                if tokens.events > events:  # how late its next token is, while it is
                    front._sched.token_event(plan, inst, step, time.monotonic())
                # what the decode side really gives per token, once a finished stream
                # has told how many tokens an event carries (before, a window counts
                # events: ~2x on the tiny model, and the long-run quantile keeps it)
                if window is not None and front._sched.counts_tokens(inst):
                    front._sched.observe_tpot(inst, *window, time.monotonic())
            if strip and not (chunk := strip_usage(chunk)):
                continue
            yield chunk
    except (httpx.HTTPError, InstanceDied) as exc:
        front.stats.failed += 1
        msg = f"the decode instance failed mid-stream ({type(exc).__name__}); retry"
        yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error'}})}\n\n".encode()
        yield b"data: [DONE]\n\n"
        if plan is not None:
            front._sched.finished(plan, inst)
        return
    finally:
        watch.close()
        inst.decoding -= 1
        await resp.aclose()
    if plan is not None:
        front._sched.finished(plan, inst)
        if held is not None and (tokens.completion_tokens or 1) <= 1:
            first_token(front, plan, inst, held, record)
        if (counts := tokens.tokens_after_first()) is not None:
            front._sched.observe_events(inst, *counts)
