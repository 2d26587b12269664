"""The front end's prefill gate (`pd/prefill_gate.py`): admitted prefills reach their
instance one at a time in admission order, and the scheduler counts those still held at
the gate whole (they have not started), so a later admission never joins, and delays, the
step of an earlier one (#19: a burst batched into one 0.9 s step, each predicted 0.1-0.4 s)."""

from __future__ import annotations

import asyncio
import math

from moska.pd.frontend import FrontEnd, FrontEndConfig
from moska.pd.prefill_gate import PrefillGate
from moska.pd.scheduler import SLO, GlobalScheduler, Instance, RequestInfo

BS = 16


class _Resp:
    def __init__(self, body: dict) -> None:
        self.status_code, self._body = 200, body

    def json(self) -> dict:
        return self._body


class _FakeHTTP:
    """The instances' HTTP: a prefill POST returns when the test releases it."""

    def __init__(self) -> None:
        self.in_flight = self.most = 0
        self.order: list[int] = []
        self.release: dict[int, asyncio.Event] = {}

    async def post(self, url: str, json=None, headers=None, params=None):
        if "/pd/accept/" in url:
            return _Resp({})
        n = len(json["prompt"])  # each request's prompt length tells it apart
        self.order.append(n)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await self.release.setdefault(n, asyncio.Event()).wait()
        self.in_flight -= 1
        return _Resp({})

    async def get(self, url: str, params=None):
        return _Resp({"blocks": 1, "seconds": 0.0, "prompt_tokens": 32})


def _front(width: int):
    insts = [Instance("p0", "http://p0", "prefill", 0, BS, 1000, 8)]
    insts.append(Instance("d0", "http://d0", "decode", 1, BS, 1000, 8))
    sched = GlobalScheduler(insts, SLO())
    front = FrontEnd(insts, sched, FrontEndConfig(prefill_width=width))
    return front, sched, insts[0], insts[1]


def _run(width: int):
    async def run():
        front, sched, p, d = _front(width)
        front._gates = {"p0": PrefillGate(width)} if width else {}
        http = front.client = _FakeHTTP()  # type: ignore[assignment]
        plans, tasks = [], []
        for k in range(4):  # four prompts admitted at once, lengths 33..36
            n = 33 + k
            plan = sched.plan(RequestInfo((k,), n, 4), now=0.0)
            plans.append(plan)
            body = {"prompt": list(range(n))}
            tasks.append(asyncio.create_task(front._prefill(plan, "/v1/completions", body, k, d)))
        for _ in range(5):
            await asyncio.sleep(0)
        starts = [p.prefills[pl.ticket][1] for pl in plans]
        queue = p.queue_s(0.0)
        for k in range(4):  # the instance answers them in turn, each once it has ended
            http.release.setdefault(33 + k, asyncio.Event()).set()
            await asyncio.wait({tasks[k]}, timeout=30)
        assert all(t.done() and t.result() is None for t in tasks)
        return http, starts, queue, plans, p

    return asyncio.run(run())


def test_prefills_go_one_at_a_time_in_admission_order():
    http, starts, queue, plans, p = _run(1)
    assert http.most == 1  # without the gate all four were at the instance at once
    assert http.order == [33, 34, 35, 36]
    # the first started, the three behind it not yet: they count their whole prediction
    assert not math.isnan(starts[0]) and all(math.isnan(s) for s in starts[1:])
    preds = [pl.predicted_prefill_s for pl in plans]
    assert queue >= sum(preds[1:])
    assert not p.prefills  # each left the queue when its instance answered


def test_no_gate_sends_all_at_once():
    http, starts, _, _, _ = _run(0)
    assert http.most == 4 and not any(math.isnan(s) for s in starts)


def test_the_gate_is_fifo_under_contention():
    async def run():
        gate, order, inside = PrefillGate(2), [], []

        async def one(k: int) -> None:
            async with gate.turn(lambda: order.append(k)):
                inside.append(k)
                assert len(inside) <= 2
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                inside.remove(k)

        await asyncio.gather(*(one(k) for k in range(10)))
        return order, gate.waiting

    order, waiting = asyncio.run(run())
    assert order == list(range(10)) and waiting == 0


def test_held_prefills_count_at_their_learnt_service_time():
    """Behind the gate each prefill ahead pays its fixed costs in turn (HTTP, tokenizing,
    the step's overhead), which its step-fit seconds leave out: the queue counts each at
    the service time learnt from the prefills before (gate -> answer)."""
    _, sched, p, _ = _front(1)
    now = 0.0
    for k in range(12):  # each took 0.25 s from its turn, the step fits said ~0.01-0.03 s
        plan = sched.plan(RequestInfo((100 + k,), 17 + 3 * k, 4), now)
        sched.prefill_started(plan, now)
        sched.prefill_computed(plan, now + 0.25)
        sched.prefill_done(plan)
        sched.finished(plan, plan.decode)
        now += 0.3
    plans = [sched.plan(RequestInfo((200 + k,), 20, 4), now) for k in range(4)]
    step_fit = sum(pl.predicted_prefill_s for pl in plans)
    assert step_fit < 0.2  # what the old queue counted for the four held
    assert 0.8 <= p.queue_s(now) <= 1.2  # four held at ~0.25 s each


def test_a_wider_gate_drains_its_queue_that_many_at_a_time():
    _, sched, p, _ = _front(2)
    plans = [sched.plan(RequestInfo((300 + k,), 40, 4), 0.0) for k in range(4)]
    held = p.queue_s(0.0)
    nxt = sched.plan(RequestInfo((400,), 40, 4), 0.0)
    assert held > 0 and len(plans) == 4
    assert (
        abs(nxt.stage_x - (held / 2 + nxt.predicted_prefill_s + sched.transfer_s(39 // BS))) < 1e-9
    )
