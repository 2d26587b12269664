"""#19: the TPOT factor counts tokens, not SSE events. A relayed event carries a token only
when it adds text (the byte-level tiny model: ~1.9 tokens per event on the trace bench), so
counting events put each token at the time of two and the admission's TPOT prediction at
~2x what clients saw. Driven through the front end's relay on a fake clock."""

from __future__ import annotations

import asyncio
import json
import time
import types

import pytest

from moska.pd import relay as relay_mod
from moska.pd import token_times
from moska.pd.frontend import FrontEnd
from moska.pd.scheduler import SLO, GlobalScheduler, Instance, Plan, RequestInfo
from moska.pd.token_times import strip_usage, with_usage
from moska.server.streaming import SSE_DONE, sse

TOKENS, PER_EVENT = 24, 2  # a stream of 24 tokens, text (an event) every second token


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def monotonic(self) -> float:
        return self.t


class _Stream:
    """A decode instance's SSE answer: one engine step of `step_s` per token, an event
    every PER_EVENT tokens, then the usage chunk and [DONE] (as moska's server sends)."""

    def __init__(self, clock: _Clock, step_s: float) -> None:
        self.clock, self.step_s = clock, step_s

    async def aiter_raw(self):
        base = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m"}
        for k in range(TOKENS):
            self.clock.t += self.step_s
            if (k + 1) % PER_EVENT == 0:
                reason = "length" if k == TOKENS - 1 else None
                choice = {"index": 0, "text": "é", "logprobs": None, "finish_reason": reason}
                yield sse({**base, "choices": [choice], "usage": None})
        usage = {"prompt_tokens": 40, "completion_tokens": TOKENS, "total_tokens": 40 + TOKENS}
        yield sse({**base, "choices": [], "usage": usage}) + SSE_DONE

    async def aclose(self) -> None:
        return None


def _relay_streams(monkeypatch, n: int) -> tuple[GlobalScheduler, Instance, _Clock, list]:
    clock = _Clock()
    fake_time = types.SimpleNamespace(monotonic=clock.monotonic, time=time.time)
    monkeypatch.setattr(token_times, "time", fake_time)
    monkeypatch.setattr(relay_mod, "time", fake_time)
    p = Instance("p0", "http://p0", "prefill", 0, 16, 1000, 8)
    d = Instance("d0", "http://d0", "decode", 1, 16, 1000, 8)
    sched = GlobalScheduler([p, d], SLO())
    front = FrontEnd([p, d], sched)
    out: list = []

    async def run() -> None:
        front._dead = {i.name: asyncio.Event() for i in (p, d)}
        for i in range(n):
            req = RequestInfo((1000 + i,), 40, TOKENS)
            plan = sched.plan(req, clock.t)
            assert isinstance(plan, Plan)
            # the decode side runs exactly as its step fit says, at the batch it has (one)
            resp = _Stream(clock, sched.tpot_s(1, d))
            out.append([c async for c in front._relay(d, resp, plan, None, clock.t, True)])

    asyncio.run(run())
    return sched, d, clock, out


def test_tpot_factor_counts_tokens_not_events(monkeypatch):
    sched, d, clock, out = _relay_streams(monkeypatch, 5)
    assert sched.tokens_per_event(d) == pytest.approx((TOKENS - 1) / (TOKENS / PER_EVENT - 1))
    # the decode side gives tokens exactly as fitted: the factor must be ~1 (events: ~2)
    assert 0.85 < sched.tpot_factor(d, clock.t) < 1.15
    plan = sched.plan(RequestInfo((7,), 40, TOKENS), clock.t)
    assert isinstance(plan, Plan)
    assert plan.predicted_tpot_s == pytest.approx(sched.tpot_s(1, d), rel=0.15)
    # the client did not ask for usage: the usage chunk asked of the instance is dropped
    sent = b"".join(out[-1])
    assert b'"completion_tokens"' not in sent and sent.endswith(SSE_DONE)
    assert sent.count(b'"finish_reason"') == TOKENS // PER_EVENT


def test_with_usage_and_strip_usage():
    body = {"prompt": [1, 2], "stream": True, "stream_options": {"include_usage": False}}
    sent, strip = with_usage(body)
    assert sent["stream_options"] == {"include_usage": True} and strip
    assert body["stream_options"] == {"include_usage": False}  # the client's body untouched
    asked = {"prompt": [1], "stream": True, "stream_options": {"include_usage": True}}
    assert with_usage(asked) == (asked, False)
    assert with_usage({"prompt": [1]}) == ({"prompt": [1]}, False)  # not a stream
    token = sse({"choices": [{"text": "a", "finish_reason": None}], "usage": None})
    usage = sse({"choices": [], "usage": {"completion_tokens": 3}})
    assert strip_usage(token + usage + SSE_DONE) == token + SSE_DONE
    assert strip_usage(usage) == b""
    assert strip_usage(token) == token
    assert json.loads(strip_usage(token)[6:])["choices"][0]["text"] == "a"
