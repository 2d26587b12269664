"""#19, session 15: a stream whose tokens all come in one event. A model without a tokenizer
(the 2-GPU trace's random 8B-dim checkpoint) has no text to stream, so the server sends a
request's whole output in its final event. The front end took that event's time as the
first token's (~0.13 s learnt as the decode stage's fixed cost: its TTFT admitted 15% of
the trace) and the bench client read the last token's time as TTFT and TPOT 0.0 for every
request. Now: the front end does not learn a first token from such an event, the client
reports the request as `unmeasured` (never within an SLO), and the random checkpoint gets
a tokenizer whose every token adds text."""

from __future__ import annotations

import asyncio
import time
import types

import httpx

from moska.bench.random_checkpoint import write_tokenizer
from moska.bench.trace_client import _one, request_body
from moska.bench.trace_summary import summarize
from moska.model.tokenizer import IncrementalDetokenizer, Tokenizer
from moska.pd import relay as relay_mod
from moska.pd import token_times
from moska.pd.frontend import FrontEnd
from moska.pd.scheduler import SLO, GlobalScheduler, Instance, Plan, RequestInfo
from moska.server.streaming import SSE_DONE, sse

BASE = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m"}


def _events(tokens: int, per_event: int) -> list[bytes]:
    """A completion stream of `tokens` tokens, an event every `per_event` tokens (all in
    the last event when per_event >= tokens), then usage and [DONE]."""
    out, n = [], 0
    for k in range(tokens):
        if (k + 1) % per_event == 0 or k == tokens - 1:
            reason = "length" if k == tokens - 1 else None
            text = "" if per_event >= tokens else " t"
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            out.append(sse({**BASE, "choices": [choice], "usage": None}))
            n += 1
    usage = {"prompt_tokens": 40, "completion_tokens": tokens, "total_tokens": 40 + tokens}
    out.append(sse({**BASE, "choices": [], "usage": usage}) + SSE_DONE)
    return out


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def monotonic(self) -> float:
        return self.t


class _Stream:
    """A decode instance's answer: `tokens` engine steps of `step_s`, then one event."""

    def __init__(self, clock: _Clock, tokens: int, step_s: float) -> None:
        self.clock, self.tokens, self.step_s = clock, tokens, step_s

    async def aiter_raw(self):
        for chunk in _events(self.tokens, self.tokens):
            self.clock.t += self.step_s * (self.tokens if b'"finish_reason"' in chunk else 0)
            yield chunk

    async def aclose(self) -> None:
        return None


def _relay(monkeypatch, tokens: int, n: int) -> tuple[GlobalScheduler, Instance]:
    clock = _Clock()
    fake_time = types.SimpleNamespace(monotonic=clock.monotonic, time=time.time)
    monkeypatch.setattr(token_times, "time", fake_time)
    monkeypatch.setattr(relay_mod, "time", fake_time)
    p = Instance("p0", "http://p0", "prefill", 0, 16, 1000, 8)
    d = Instance("d0", "http://d0", "decode", 1, 16, 1000, 8)
    sched = GlobalScheduler([p, d], SLO())
    front = FrontEnd([p, d], sched)

    async def run() -> None:
        front._dead = {i.name: asyncio.Event() for i in (p, d)}
        for i in range(n):
            plan = sched.plan(RequestInfo((1000 + i,), 40, tokens), clock.t)
            assert isinstance(plan, Plan)
            record: dict = {}
            resp = _Stream(clock, tokens, 0.01)
            sent = [c async for c in front._relay(d, resp, plan, None, clock.t, True, record)]
            assert b"".join(sent).endswith(SSE_DONE)
            assert ("observed_first_s" in record) == (tokens == 1), record

    asyncio.run(run())
    return sched, d


def test_front_end_does_not_learn_a_whole_stream_as_its_first_token(monkeypatch):
    sched, d = _relay(monkeypatch, tokens=24, n=6)
    # the old front end learnt 6 first tokens of 0.24 s (24 steps) against ~0.01 s of fit
    assert sched.ttft.fit("decode", d.name).count == 0
    assert sched.ttft.first_s(d.name, 0.01, 200.0) < 0.05
    # a one-token stream's one event is its first token: still learnt
    sched, d = _relay(monkeypatch, tokens=1, n=3)
    assert sched.ttft.fit("decode", d.name).count == 3


def _client_result(chunks: list[bytes]):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"".join(chunks),
                              headers={"content-type": "text/event-stream"})  # fmt: skip

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await _one(client, "http://x", request_body([1, 2, 3], 20), time.monotonic())

    return asyncio.run(run())


def test_client_reports_one_event_streams_as_unmeasured():
    one = _client_result(_events(20, 20))
    assert one.status == 200 and one.tokens == 20 and one.events == 1
    assert one.unmeasured and one.tpot_s is None  # the old client: TPOT 0.0, "within SLO"
    per_token = _client_result(_events(20, 1))
    assert per_token.events == 20 and not per_token.unmeasured and per_token.tpot_s is not None
    report = summarize([one, per_token], 1.0, ttft_slo=10.0, tpot_slo=10.0)
    assert report["completed"] == 2 and report["unmeasured"] == 1
    assert report["goodput_rps"] == 1.0 and report["within_both_slos_of_admitted"] == 0.5
    only = summarize([one], 1.0, ttft_slo=10.0, tpot_slo=10.0)
    assert only["goodput_rps"] == 0.0 and only["tpot_p99_s"] is None


def test_random_checkpoint_tokenizer_gives_text_for_every_token(tmp_path):
    write_tokenizer(tmp_path, 300)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == 300
    detok = IncrementalDetokenizer(tok, [5, 6, 7])
    deltas = [detok.add(i) for i in (0, 1, 2, 17, 299, 17)]
    assert all(deltas) and deltas[3] == deltas[5] != deltas[4]
