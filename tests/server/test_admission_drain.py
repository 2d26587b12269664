"""Admission keeps its promise under a burst: the step in progress counts only its
remainder, a slower machine is seen within a few steps, Retry-After grows with the queue,
and a request that would miss the SLO is answered 429 without the engine ever seeing it.
Plain Python on a virtual clock, and one fake-engine server: about a second."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import pairwise

import httpx
import numpy as np
import pytest
from fake_engine import FakeEngine
from test_admission import BUDGET, MAX_SEQS, TRUE, VirtualServer, warm_up

from moska.server.admission import AdmissionController, EngineLimits, Load, RequestCost
from moska.server.app import create_app
from moska.server.background import background_server
from moska.server.settings import ServerSettings
from moska.server.step_model import DEFAULT_PRIOR, StepFeatures
from moska.server.step_model import feature_vector as _x


def _learned() -> tuple[AdmissionController, VirtualServer]:
    adm = AdmissionController(None, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    server = VirtualServer(adm)
    warm_up(server)
    return adm, server


def test_a_queued_burst_mid_step_is_predicted_from_what_is_left_of_the_step():
    """A burst that one prefill step serves: asked a quarter, half and three quarters into
    that step, the prediction for a probe is what is left of the step plus the probe's own
    step (on the true clock, within 20%): it falls as the step runs."""
    adm, server = _learned()
    burst = [RequestCost(100, 8) for _ in range(4)]  # 400 tokens: one step of the budget
    for cost in burst:
        assert server.submit(cost)[1].accepted
    before = server.load()
    t0 = server.t
    server.step()
    step = server.t - t0
    probe = RequestCost(50, 8)
    own = float(_x(StepFeatures(50, 0, len(burst), 0)) @ TRUE)  # decodes the burst too
    preds = []
    for frac in (0.25, 0.5, 0.75):
        busy = frac * step
        preds.append(adm.predict(probe, replace(before, busy_s=busy)).ttft_s)
        true = step - busy + own
        assert abs(preds[-1] / true - 1) < 0.2, (frac, preds[-1], true)
    assert preds[0] - preds[-1] > 0.4 * step, preds
    server.run_until_idle()


def test_requests_submitted_during_a_step_wait_for_the_next_one():
    """Four requests decode; one more was submitted and a new one asks. Between steps both
    join the next step; during a step they wait for it to end first."""
    adm = AdmissionController(None, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    load = Load((RequestCost(100, 8),), running=((8, 0),) * 4, num_pending=1)
    between = adm.predict(RequestCost(100, 8), load).ttft_s
    during = adm.predict(RequestCost(100, 8), replace(load, busy_s=1e-9)).ttft_s
    decode = adm.step_s(StepFeatures(num_decode=4))
    assert during - between == pytest.approx(decode, rel=1e-6)


def test_slowdown_follows_the_machine_within_a_few_steps():
    adm, _ = _learned()
    f = StepFeatures(200, 0, 16, 0)
    fit = adm.step_s(f)
    for _ in range(8):  # other processes take the cores: every step 3x slower
        adm.observe_step(3 * fit, f)
    # at least the new speed, more while the change is recent (planned on the slow side)
    assert 2.4 * fit < adm.step_s(f) < 5 * fit
    for _ in range(8):
        adm.observe_step(3 * fit, f)
    assert 2.4 * fit < adm.step_s(f) < 3.6 * fit
    for _ in range(16):  # and they leave
        adm.observe_step(fit, f)
    assert 0.8 * fit < adm.step_s(f) < 1.3 * fit


def test_retry_after_grows_with_the_queue():
    adm, _ = _learned()
    adm.ttft_slo = 0.5
    drains, retries = [], []
    for n in (32, 64, 128, 256, 512):
        d = adm.decide(RequestCost(100, 8), _queue(n))
        assert not d.accepted
        drains.append(d.drain_s)
        retries.append(d.retry_after_s)
    assert all(b > a for a, b in pairwise(drains)), drains
    assert all(b >= a for a, b in pairwise(retries)), retries
    # FIFO: the drain is the queue's predicted time less what fits the SLO
    np.testing.assert_allclose(
        drains[-1], adm.predict_ttft(RequestCost(100, 8), _queue(512)) - 0.85 * 0.5, rtol=1e-6
    )


def _queue(n: int) -> Load:
    return Load(tuple(RequestCost(200, 8) for _ in range(n)))


class _GatedEngine(FakeEngine):
    """A fake engine whose steps wait for `gate`; counts the requests it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.stepping = threading.Event()
        self.added: list[str] = []

    def add_request(self, request_id, prompt, params, **kw):
        self.added.append(request_id)
        super().add_request(request_id, prompt, params, **kw)

    def step(self):
        self.stepping.set()
        assert self.gate.wait(30)
        return super().step()


def test_a_request_that_cannot_meet_the_slo_is_rejected_before_the_engine_sees_it():
    """SLO 1 s and steps that cost 2 s (the prior): the first request of an idle server
    is admitted; while its step runs, each of a burst would wait for the rest of it plus
    a step of its own, so each gets a 429 with a Retry-After and the predicted drain, and
    the engine is handed nothing but the first request."""
    engine = _GatedEngine()
    admission = AdmissionController(1.0, None, prior=(2.0, 0.3, 10.0, 0.5, 0.05))
    app = create_app(engine, ServerSettings(), admission=admission)
    body = {"model": "fake-model", "prompt": "hello", "max_tokens": 2}
    with background_server(app) as url, ThreadPoolExecutor(9) as pool:
        first = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30)
        assert engine.stepping.wait(30)
        burst = list(
            pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=30), range(8))
        )
        assert len(engine.added) == 1
        engine.gate.set()
        assert first.result().status_code == 200
    assert all(r.status_code == 429 for r in burst), [r.status_code for r in burst]
    for r in burst:
        assert int(r.headers["retry-after"]) >= 1
        drain = float(r.json()["error"]["message"].split("predicted drain ")[1].split("s)")[0])
        assert abs(int(r.headers["retry-after-ms"]) - 1000 * drain) <= 5  # rounded to 10 ms
    assert len(engine.added) == 1
    assert admission.door.inside == 0  # every request that passed the door left it


def test_the_door_sheds_with_the_requests_inside_in_view():
    """Nothing queued in the engine, but 200 requests past the door and not yet decided:
    a newcomer would wait behind them, so the door sheds it; its drain is at least their
    wait at the door. When they leave (decided), the door opens again. The memo does not
    hide a backlog that grew since it was taken."""
    adm, _ = _learned()
    adm.ttft_slo = 1.0
    busy = Load(running=((8, 0),))
    assert adm.shed(busy) is None
    tickets = [adm.door.enter() for _ in range(200)]
    shed = adm.shed(busy)  # within the memo's lifetime, but 200 more inside
    assert shed is not None and shed.verdict.value == "ttft_slo"
    assert shed.drain_s >= adm.door.wait_s > 0
    for t in tickets:
        adm.door.leave(t)
    adm.shed_ttl_s = 0.0
    assert adm.door.inside == 0 and adm.shed(busy) is None


def test_the_door_learns_its_gap_within_a_busy_period_only():
    """Two leaves of one busy period are a service gap; the time the door stood empty
    between two bursts is not (it had inflated a retry's wait at the door 3x)."""
    from moska.server.front_door import FrontDoor

    door = FrontDoor(prior_gap_s=0.005, alpha=1.0, min_backlog=2)
    first = [door.enter() for _ in range(3)]
    for t in first:
        door.leave(t)
    assert door.gap_s < 0.5 and door.inside == 0
    door._last_leave -= 30.0  # the door stood empty for 30 s: the next burst comes
    door.gap_s = 0.005
    burst = [door.enter() for _ in range(3)]
    door.leave(burst[0])  # first leave of the new busy period: no gap learned
    assert door.gap_s == 0.005
    door.leave(burst[1])  # the second: a real (tiny) service gap
    assert door.gap_s < 0.5
    door.leave(burst[2])


def test_the_door_learns_no_gap_from_a_small_wave():
    """With `min_backlog` 32, a wave of fewer requests (decided many to a loop iteration)
    leaves the prior; a storm's leaves are learnt (the default stays 2: see FrontDoor)."""
    from moska.server.front_door import FrontDoor

    door = FrontDoor(prior_gap_s=0.005, alpha=1.0, min_backlog=32)
    wave = [door.enter() for _ in range(24)]
    for t in wave:
        door.leave(t)
    assert door.gap_s == 0.005
    storm = [door.enter() for _ in range(40)]
    for t in storm:
        door.leave(t)
    assert door.gap_s < 0.005  # a storm's leaves (back to back here) are learnt


def test_a_decision_takes_the_request_out_of_the_door():
    from moska.server.front_door import TICKET

    adm = AdmissionController(None, None)
    ticket = adm.door.enter()
    token = TICKET.set(ticket)
    try:
        adm.decide(RequestCost(8), Load())
    finally:
        TICKET.reset(token)
    assert adm.door.inside == 0 and ticket.left
    adm.door.leave(ticket)  # the middleware's own leave afterwards is a no-op
    assert adm.door.inside == 0


def test_a_library_request_must_fit_with_its_error_when_others_queue_before_it():
    """Requests queued before a library request share its prefill step, the least
    predictable one: it is admitted only if 1.5x its prediction fits; a plain request
    with the same prediction is admitted, and so is the library request with no queue."""
    adm = AdmissionController(1.0, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    queue = Load((RequestCost(50, 8),), running=((8, 0),))
    lib = RequestCost(50, 8, library_attend=512)
    pred = adm.predict_ttft(lib, queue)
    adm.ttft_slo = 1.2 * pred / adm.headroom  # fits alone, not with 1.5x
    assert not adm.decide(lib, queue).accepted
    per_pair = DEFAULT_PRIOR[2] / DEFAULT_PRIOR[1] / 1e3  # a library pair in prompt tokens
    plain_like = RequestCost(50 + round(50 * 512 * per_pair), 8)  # about as slow
    assert adm.predict_ttft(plain_like, queue) < 1.2 * pred
    assert adm.decide(plain_like, queue).accepted
    assert adm.decide(lib, Load(running=((8, 0),))).accepted
