"""#15.4 (session 17): a 429's promise scaled by how the server's own promises came out
(`admission_promises.PromiseScale`), and the bench's score of a 429 by dry retries of its
own body (`load_retry`)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import time
from types import SimpleNamespace

import pytest

from moska.bench.load_retry import sample_every, score, summarize_own, verdict
from moska.server.admission import AdmissionController, EngineLimits, Load, RequestCost
from moska.server.admission_promises import PromiseScale, group_of

PLAIN, LIB = RequestCost(100, 16), RequestCost(100, 16, 2048)


def test_groups_by_kind_and_place() -> None:
    assert group_of(PLAIN, True) == "plain_door"
    assert group_of(LIB, False) == "library_queue"


def _run(scale: PromiseScale, bias: float, raw: float, n: int, rng: random.Random) -> None:
    """n 429s of plain_queue, 0.1 s apart, with raw promises about `raw` whose requests
    would really be admitted `bias` x their raw promise later; checked every 10 ms. Each
    request's id (its prompt tokens) keys its true admission time."""
    now, admit_at = 0.0, {}
    for i in range(n):
        r = raw * rng.uniform(0.8, 1.25)
        admit_at[i + 1] = now + bias * r
        scale.promise("plain_queue", RequestCost(i + 1, 16), r, now)
        for _ in range(10):
            now += 0.01
            scale.due(now, lambda c, t=now: t >= admit_at[c.prompt_tokens])


def test_a_biased_group_is_learnt_and_the_others_stay() -> None:
    rng = random.Random(1)
    for bias in (3.0, 0.3):
        scale = PromiseScale()
        _run(scale, bias, 1.0, 60, rng)
        f = scale.factor("plain_queue")
        assert abs(math.log(f / bias)) < math.log(1.5), (bias, f)  # within 1.5x of the bias
        assert scale.factor("library_door") == 1.0 and scale.seen["plain_queue"] >= 4


def test_factor_is_clamped_disabled_and_not_fed_by_itself() -> None:
    scale = PromiseScale(alpha=1.0, clamp=4.0)
    scale.observe("library_door", 100.0, 1.0, 0.0)
    assert scale.factor("library_door") == 4.0
    # the promise made is raw x factor, but what is learnt is observed / raw
    assert scale.promise("library_door", LIB, 2.0, 0.0) == 8.0
    scale.due(0.35, lambda c: False)
    scale.due(0.5, lambda c: True)  # admitted 0.5 s after a raw 2.0 s promise
    assert math.isclose(scale.factor("library_door"), 0.25)
    scale.enabled = False
    assert scale.factor("library_door") == 1.0


def test_an_unresolved_promise_closes_at_its_horizon_as_a_lower_bound() -> None:
    scale = PromiseScale(alpha=1.0, horizon=4.0, min_horizon_s=0.0)
    scale.promise("plain_door", PLAIN, 1.0, 0.0)
    assert scale.due(2.0, lambda c: False) == 1 and scale.seen["plain_door"] == 0
    scale.due(4.5, lambda c: False)  # past 4 x 1.0 s: closed with 4.5 s seen
    assert scale.seen["plain_door"] == 1 and math.isclose(scale.factor("plain_door"), 4.0)


def test_checks_are_rate_limited_per_group_and_share_a_cost() -> None:
    scale = PromiseScale(sample_s=0.0, check_s=0.1, max_open=4)
    for i in range(5):
        scale.promise("plain_queue", PLAIN, 1.0, i * 1e-3)
    assert len(scale.open["plain_queue"]) == 4  # full: the oldest are kept
    calls: list[int] = []
    assert scale.due(0.01, lambda c: calls.append(1) is None and False) == 1  # one cost
    scale.due(0.05, lambda c: calls.append(1) is None and False)  # within check_s: none
    assert len(calls) == 1
    scale.due(0.2, lambda c: True)  # admitted 0.19 s after the last refusal: all learnt
    assert scale.seen["plain_queue"] == 4 and not scale.open["plain_queue"]


def test_an_admission_long_after_the_last_check_is_not_learnt_from() -> None:
    """No decision for 3 s, then one admits: the drain is anywhere in (0, 3 s], so the
    promise of 0.5 s is neither confirmed nor refuted (a quiet gap, not a drain)."""
    scale = PromiseScale(alpha=1.0, min_horizon_s=10.0)
    scale.promise("library_queue", LIB, 0.5, 0.0)
    scale.due(3.0, lambda c: True)
    assert scale.seen["library_queue"] == 0 and not scale.open["library_queue"]


def test_controller_learns_a_too_long_queue_promise() -> None:
    """Live controller: a plain request refused on a long queue; the queue then empties
    (it would be admitted at once): the next 429's promise of that group is shorter."""
    adm = AdmissionController(1.0, None, limits=EngineLimits(512, 8))
    adm.promises = PromiseScale(alpha=1.0, sample_s=0.0, check_s=0.05)
    now = [100.0]
    adm.clock = lambda: now[0]
    busy = Load((RequestCost(400, 16),) * 60, (), 59, 0.0)
    first = adm.decide(PLAIN, busy)
    now[0] += 0.06
    assert not first.accepted and first.drain_s > 0
    assert len(adm.promises.open["plain_queue"]) == 1
    adm.decide(PLAIN, Load((RequestCost(8, 16),), (), 0, 0.0))  # a check on a short queue
    assert adm.promises.seen["plain_queue"] == 1
    again = adm.decide(PLAIN, busy)
    assert again.drain_s < first.drain_s / 2  # observed at once: scaled down


def test_own_retry_verdicts_and_score() -> None:
    assert verdict({"half": [0.1, False], "at": [0.2, True], "double": [0.4, True]}) == "within"
    assert verdict({"half": [0.1, True], "at": [0.2, True], "double": [0.4, True]}) == "long"
    assert verdict({"half": [0.1, False], "at": [0.2, False], "double": [0.4, False]}) == "short"
    assert verdict({"half": [0.1, True], "at": [0.2, False], "double": [0.4, False]}) == "flicker"
    assert verdict({"half": [0.1, None], "at": [0.2, True], "double": [0.4, True]}) is None
    recs = [
        {
            "library": lib,
            "at_door": door,
            "t_status": 0.5,
            "prompt_chars": 9,
            "retry_after_ms": "400",
            "own_retries": {"half": [0.2, h], "at": [0.4, a], "double": [0.8, d]},
        }
        for lib, door, h, a, d in [
            (False, True, False, True, True),
            (False, True, True, True, True),
            (True, False, False, False, False),
            (True, False, False, True, True),
        ]
    ]
    out = summarize_own(recs + [{"library": False, "retry_after_ms": "5"}])
    assert out["all"]["n"] == 4 and out["all"]["within"] == 0.5
    assert out["by_group"]["plain_door"]["long"] == 0.5
    assert out["by_group"]["library_queue"]["short"] == 0.5
    assert out["all"]["admitted_at_promise"] == 0.75
    assert score([])["within"] is None
    assert sample_every(64) == 1 and sample_every(1000) == 10


class _VirtualTime:
    """`perf_counter` and `sleep` on a clock that moves only when a sleep ends, to the time
    that sleep asked for, the earliest first: what is timed does not depend on how late a
    loaded machine runs the sleeper (a 20 ms window of real time did)."""

    def __init__(self) -> None:
        self.now = 50.0
        self._wakes: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def perf_counter(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._wakes, (self.now + max(0.0, delay), next(self._seq), fut))
        await fut

    async def run(self, coro):
        """Run `coro`; whenever every task is asleep, end the earliest sleep."""
        task = asyncio.ensure_future(coro)
        while True:
            for _ in range(20):  # no I/O and no real timers: each task runs until it sleeps
                await asyncio.sleep(0)
            if task.done():
                return task.result()
            assert self._wakes, "nothing asleep and not done"
            at, _, fut = heapq.heappop(self._wakes)
            self.now = max(self.now, at)
            fut.set_result(None)


def test_own_retries_are_sent_at_the_multiples_of_the_promise(monkeypatch) -> None:
    from moska.bench import load_retry

    clock = _VirtualTime()
    monkeypatch.setattr(load_retry, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(
        load_retry, "asyncio", SimpleNamespace(sleep=clock.sleep, gather=asyncio.gather)
    )
    sent: list[float] = []
    t0 = clock.now
    rec = {"t_status": 0.01, "retry_after_ms": "40", "dry_admitted": False}

    async def send() -> dict:
        t = clock.perf_counter() - t0
        sent.append(t)
        return {"status": 429, "dry_admitted": t > 0.06, "t_start": t}

    got = asyncio.run(clock.run(load_retry.own_retries(rec, t0, send)))
    # half, once and twice the 40 ms promise after the 429's status (10 ms from t0)
    assert sent == [pytest.approx(t) for t in (0.03, 0.05, 0.09)]
    assert got == {"half": [0.02, False], "at": [0.04, False], "double": [0.08, True]}


def test_the_scale_fades_with_time_since_it_last_learnt() -> None:
    scale = PromiseScale(alpha=1.0, memory_s=5.0)
    scale.observe("plain_door", 3.0, 1.0, 10.0)
    assert math.isclose(scale.factor("plain_door", 10.0), 3.0)
    assert math.isclose(scale.factor("plain_door", 15.0), 3.0 ** math.exp(-1.0))
    assert scale.factor("plain_door", 100.0) < 1.001
    scale.observe("plain_door", 1.0, 1.0, 100.0)  # a new burst learns from ~1, not from 3
    assert math.isclose(scale.factor("plain_door", 100.0), 1.0)


def test_a_bench_probe_is_decided_with_the_scale_but_not_learnt_from() -> None:
    from moska.bench.load_probe import PROBE, DryProbeAdmission

    adm = DryProbeAdmission(1.0, None, limits=EngineLimits(512, 8))
    adm.promises = PromiseScale(sample_s=0.0, alpha=1.0)
    adm.promises.observe("plain_queue", 2.0, 1.0, time.monotonic())  # learnt: 2x too short
    busy = Load((RequestCost(400, 16),) * 60, (), 59, 0.0)
    token = PROBE.set(True)
    try:
        probe = adm.decide(PLAIN, busy)
    finally:
        PROBE.reset(token)
    assert not adm.promises.open["plain_queue"] and adm.promises.recording
    real = adm.decide(PLAIN, busy)
    assert len(adm.promises.open["plain_queue"]) == 1
    assert math.isclose(probe.drain_s, real.drain_s, rel_tol=0.05)  # both scaled alike
    raw = adm._drain(PLAIN, busy)[1]
    assert 1.8 < real.drain_s / raw <= 2.0


def test_the_door_opens_once_those_inside_are_down_to_what_fits() -> None:
    """`retry_drain.door_opens_s`: (inside - the count that fits ahead) x the time per
    decision, against a replay stub where each request ahead adds 0.1 s of TTFT."""
    from moska.server.queue_replay import Prediction
    from moska.server.retry_drain import door_admits, door_opens_s

    class Pred:
        def __init__(self, ttft: float) -> None:
            self.ttft_s = ttft

    def predict(new: RequestCost, load: Load, num_requests: int = 1) -> Prediction:
        return Pred(0.1 * (len(load.waiting) + num_requests))  # type: ignore[return-value]

    fits = 2.05  # 20 typical requests fit ahead of one more
    assert door_admits(predict, PLAIN, Load(), 100, fits) == 20
    assert math.isclose(door_opens_s(predict, PLAIN, Load(), 100, fits, 0.005), 80 * 0.005)
    assert door_opens_s(predict, PLAIN, Load(), 15, fits, 0.005) == 0.0  # all fit: open
    assert door_opens_s(predict, PLAIN, Load(), 0, fits, 0.005) == 0.0
