"""A door 429's promise counts the burst still waiting to be answered (door_backlog), the
loop lag is readable during a stall, and a step past its prediction delays the drain."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from types import SimpleNamespace

import pytest

from moska.server.admission import AdmissionController, Decision, Load, RequestCost, Verdict
from moska.server.background import background_server
from moska.server.door_backlog import DoorBacklog, server_state, unanswered
from moska.server.front_door import FrontDoor
from moska.server.load_shedding import LoadSheddingMiddleware, LoopLag


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_backlog_counts_down_between_recounts_and_learns_the_time_per_answer():
    clock, waiting = Clock(), [600]
    b = DoorBacklog(prior_answer_s=0.001, tau_s=0.1, recount_s=0.02, clock=clock)
    b.count = lambda: waiting[0]
    assert b.backlog() == 600
    # a synthetic storm: the loop answers one connection every 2 ms
    for _ in range(300):
        clock.t += 0.002
        b.answered()
        waiting[0] -= 1
        b.backlog()
    assert b.backlog() == waiting[0] == 300
    assert b.answer_s == pytest.approx(0.002, rel=0.05)  # learnt from the prior's 1 ms
    assert b.storm_s() == pytest.approx(300 * 0.002, rel=0.05)


def test_backlog_learns_nothing_from_sparse_429s_on_an_idle_loop():
    clock, waiting = Clock(), [20]
    b = DoorBacklog(prior_answer_s=0.001, clock=clock)
    b.count = lambda: waiting[0]
    b.backlog()
    for _ in range(20):  # answered at once, then the loop idles a second
        b.answered()
    waiting[0] = 0
    clock.t += 1.0
    assert b.backlog() == 0
    assert b.answer_s == 0.001  # 50 ms per answer would be the idle time, not the loop's
    assert b.storm_s() == 0.0


def test_backlog_without_a_server_state_says_nothing():
    b = DoorBacklog()
    b.bind(lambda: None)  # not uvicorn's receive
    assert b.count is None and b.storm_s() == 0.0


def test_unanswered_counts_fresh_connections_and_tasks_not_done():
    done, running = SimpleNamespace(done=lambda: True), SimpleNamespace(done=lambda: False)
    fresh, served = SimpleNamespace(cycle=None), SimpleNamespace(cycle=object())
    # answered in this loop iteration: their tasks are done but still in the set
    state = SimpleNamespace(connections=[fresh, served], tasks=[done] * 800 + [running] * 5)
    assert unanswered(state, active=2) == 1 + 3


def test_uvicorn_state_is_found_behind_receive():
    seen: list = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        state = server_state(receive)
        seen.append(None if state is None else unanswered(state, active=1))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with background_server(app) as url, urllib.request.urlopen(f"{url}/x", timeout=10) as r:
        assert r.status == 204
    assert seen == [0]  # found; this request is the one active, nothing else waits


def _door_app(drain_s: float, waiting: int, answer_s: float) -> LoadSheddingMiddleware:
    no = Decision(Verdict.SLO, 9.0, 1, drain_s)

    async def inner(scope, receive, send):  # pragma: no cover - the door answers first
        raise AssertionError("a shed request reached the app")

    mw = LoadSheddingMiddleware(inner, shed=lambda: no)
    mw.backlog.count = lambda: waiting
    mw.backlog.answer_s = answer_s
    return mw


def _call(mw: LoadSheddingMiddleware, app: object = None) -> dict[str, str]:
    sent: list = []

    async def receive():
        return {"type": "http.request", "body": b'{"prompt": "x"}', "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    if app is not None:
        scope["app"] = app
    asyncio.run(mw(scope, receive, send))
    assert sent[0]["status"] == 429
    assert b"retry after" in sent[1]["body"] and json.loads(sent[1]["body"])
    return {k.decode(): v.decode() for k, v in sent[0]["headers"]}


def test_a_door_429_promises_the_connections_ahead_answered_first():
    # 500 connections wait, 2 ms each: a retry is admitted no sooner than 1 s from now
    headers = _call(_door_app(drain_s=0.24, waiting=500, answer_s=0.002))
    assert int(headers["retry-after-ms"]) == pytest.approx(240 + 1000, abs=5)
    assert headers["retry-after"] == "1"
    assert int(_call(_door_app(0.24, 0, 0.002))["retry-after-ms"]) == 240  # none waiting


def test_a_retry_may_be_sent_its_own_wait_in_the_loop_early():
    # the loop answers a new connection 0.3 s late: a retry sent 0.3 s before the last of
    # the 500 is answered after it
    lag = LoopLag()
    lag.due, lag.seconds = time.monotonic() + 10, 0.3
    state = SimpleNamespace(loop_lag=lag, admission=SimpleNamespace(door_storm=True))
    app = SimpleNamespace(state=SimpleNamespace(moska=state))
    headers = _call(_door_app(drain_s=0.24, waiting=500, answer_s=0.002), app)
    assert int(headers["retry-after-ms"]) == pytest.approx(240 + 1000 - 300, abs=5)
    state.admission.door_storm = False  # the A/B's off arm: admission's drain alone
    assert int(_call(_door_app(0.24, 500, 0.002), app)["retry-after-ms"]) == 240


def test_loop_lag_is_readable_while_the_loop_is_stalled():
    lag = LoopLag(interval_s=0.01)
    assert lag.now() == 0.0
    lag.due = time.monotonic() - 0.5  # the timer was due half a second ago: a stall
    lag.seconds = 0.09  # what the timer saw before it
    assert lag.now() >= 0.5
    lag.due = time.monotonic() + 10.0  # not yet due (whatever stalls before the read)
    assert lag.now() == 0.09


def test_a_step_past_its_prediction_delays_the_drain_it_rejects_for():
    adm = AdmissionController(5.0, None)
    running = ((12, 0),) * 8
    waiting = (RequestCost(200, 16),)
    first = adm.predict(RequestCost(64, 16), Load(waiting, running, 0, 0.0)).first_s
    busy = first + 6.0  # the step in progress has run 6 s past its prediction
    d = adm.decide(RequestCost(64, 16), Load(waiting, running, 0, busy))
    assert d.verdict is Verdict.SLO
    assert d.drain_s >= busy - first  # the old drain: the step's end was taken as now
    calm = adm.decide(RequestCost(64, 16), Load(waiting, running, 0, 0.0))
    assert calm.accepted  # the same load between steps is admitted


def test_the_door_stall_is_the_oldest_inside_plus_the_storm():
    door = FrontDoor()
    assert door.stall_s() == 0.0
    a, b = door.enter(), door.enter()
    now = time.monotonic()
    a.at, b.at = now - 2.0, now - 0.5  # entered 2 s and 0.5 s before `now`

    def stall_within(ago: float) -> bool:
        """stall_s() is `ago` plus the time since `now`, as read around the call."""
        before = time.monotonic()
        stall = door.stall_s()
        after = time.monotonic()
        return ago + (before - now) - 1e-6 <= stall <= ago + (after - now) + 1e-6

    assert stall_within(2.0)
    door.leave(a)  # not since the door was last empty: since the oldest still inside
    assert stall_within(0.5)
    door.storm_s = 1.0
    assert stall_within(0.5 + 1.0)
    door.leave(b)
    assert door.stall_s() == 0.0


class _Cycle:
    """A server's request cycle: `more_body` False once the whole body is in."""

    def __init__(self, body: bytes | None) -> None:
        self.more_body = body is None
        self.body = body or b""

    async def receive(self) -> dict:
        if self.more_body:  # a client that sent its headers and stalls
            await asyncio.Event().wait()
        return {"type": "http.request", "body": self.body, "more_body": False}


def test_the_door_reads_a_refused_body_in_without_a_timer_and_bounds_one_not_in():
    """A refused body is read for its booking key and its library name; a body already in
    needs no timer, a stalled client is given up on after `wait_s` (no key, no hang)."""
    from moska.server.bookings import BodyDigest
    from moska.server.load_shedding import _LIBRARY, _read_body

    async def read(cycle: _Cycle) -> tuple[bytes, bytes | None]:
        digest = BodyDigest("/v1/completions")
        body = await _read_body(cycle.receive, digest, wait_s=0.01)
        return body, digest.key()

    body, key = asyncio.run(read(_Cycle(b'{"library": "demo", "prompt": "x"}')))
    assert _LIBRARY.search(body) and key is not None
    again = asyncio.run(read(_Cycle(b'{"library": "demo", "prompt": "x"}')))[1]
    other = asyncio.run(read(_Cycle(b'{"library": "demo", "prompt": "y"}')))[1]
    assert again == key != other  # the same request, the same key
    body, key = asyncio.run(read(_Cycle(b'{"prompt": "say \\"library\\": \\"x\\""}')))
    assert not _LIBRARY.search(body) and key is not None
    assert asyncio.run(read(_Cycle(None))) == (b"", None)  # stalled: no key after wait_s


def test_later_adds_to_the_promise():
    d = Decision(Verdict.SLO, 9.0, 1, 0.4)
    assert d.later(0.0) is d
    later = d.later(1.3)
    assert later.drain_s == pytest.approx(1.7) and later.retry_after_s == 2
    assert later.retry_headers()["retry-after-ms"] == "1700"
