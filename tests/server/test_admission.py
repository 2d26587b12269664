"""Admission: the step-time fit, the queue replay against the real scheduler on a virtual
clock, rejection with a Retry-After that matches the drain, no SLO = no rejection, and the
metrics on /metrics. Plain Python, no model: milliseconds."""

from __future__ import annotations

import math
import random

import httpx
import numpy as np
import pytest

from moska.cache import BlockManager
from moska.engine.request import Request
from moska.engine.sampling_params import SamplingParams
from moska.engine.scheduler import Scheduler
from moska.engine.scheduler_config import SchedulerConfig
from moska.server.admission import (
    AdmissionController,
    EngineLimits,
    Load,
    RequestCost,
    Verdict,
)
from moska.server.step_model import StepFeatures, StepModel
from moska.server.step_model import feature_vector as _x

# The "hardware": seconds per unit of StepFeatures (fixed, per 1K prefill tokens, per 1M
# library pairs, per 100 decode rows, per 100 requests handed over).
TRUE = np.array([0.004, 0.2, 0.8, 0.3, 0.02])
BUDGET, MAX_SEQS = 512, 32


class VirtualServer:
    """The real Scheduler on a virtual clock: each step lasts TRUE . features(step), with
    +-5% deterministic noise. Admission sees what the async engine would show it."""

    def __init__(
        self, controller: AdmissionController, seed: int = 0, true: np.ndarray | None = None
    ) -> None:
        self.true = TRUE if true is None else true  # seconds per feature unit
        self.sched = Scheduler(
            SchedulerConfig(max_num_batched_tokens=BUDGET, max_num_seqs=MAX_SEQS),
            BlockManager(8192, 16, enable_prefix_caching=False),
        )
        self.adm = controller
        controller.clock = lambda: self.t  # the promise scale learns on this clock
        # and the factors' rests (slowdown.py)
        controller.slow.clock = controller.booked_slow.clock = lambda: self.t
        self.rng = random.Random(seed)
        self.t = 0.0
        self.costs: dict[str, RequestCost] = {}
        self.generated: dict[str, int] = {}
        self.arrival: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.predicted: dict[str, float] = {}
        self.added = 0
        self.n = 0

    def load(self) -> Load:
        live = [r for r in self.costs if r in self.arrival and self.sched.get_request(r)]
        waiting = tuple(self.costs[r] for r in live if r not in self.first)
        running = tuple(
            (self.costs[r].max_tokens - self.generated[r], self.costs[r].library_attend)
            for r in live
            if r in self.first
        )
        return Load(waiting, running)

    def submit(self, cost: RequestCost):
        rid = f"r{self.n}"
        self.n += 1
        d = self.adm.decide(cost, self.load())
        if not d.accepted:
            return rid, d
        self.costs[rid], self.generated[rid], self.arrival[rid] = cost, 0, self.t
        self.predicted[rid] = d.predicted_ttft_s
        prompt = [self.rng.randrange(10, 200) for _ in range(cost.prompt_tokens)]
        params = SamplingParams(max_tokens=cost.max_tokens, ignore_eos=True)
        self.sched.add_request(Request(rid, prompt, params))
        self.added += 1
        return rid, d

    def step(self) -> None:
        out = self.sched.schedule()
        prefill = pairs = decode = 0
        for item in out.scheduled:
            r = item.request
            attend = self.costs[r.request_id].library_attend
            pairs += attend * item.num_new_tokens
            if r.num_computed_tokens < r.num_prompt_tokens:
                prefill += item.num_new_tokens
            else:
                decode += 1
        f = StepFeatures(prefill, pairs, decode, self.added)
        dt = float(_x(f) @ self.true) * self.rng.uniform(0.95, 1.05)
        self.t += dt
        self.added = 0
        got = self.sched.update_from_output(
            out, {s.request.request_id: 7 for s in out.scheduled if s.samples}
        )
        for r in got:
            rid = r.request_id
            self.generated[rid] += 1
            if rid not in self.first:
                self.first[rid] = self.t
                self.adm.observe_ttft(self.predicted[rid], self.t - self.arrival[rid])
        self.adm.observe_step(dt, f)

    def run_until_idle(self) -> None:
        while self.sched.has_unfinished:
            self.step()

    def retry_until_admitted(self, cost: RequestCost, t0: float) -> tuple[float, float]:
        """Retry `cost` after each step until admitted: the window (s after t0) of its real
        drain, (the last step start it was still refused at, the step end it got in after)."""
        before = after = 0.0
        while not self.submit(cost)[1].accepted:
            before = self.t - t0
            self.step()
            after = self.t - t0
        return before, after

    def ttft(self, rid: str) -> float:
        return self.first[rid] - self.arrival[rid]


def mixed_cost(rng: random.Random) -> RequestCost:
    lib = rng.random() < 0.5
    return RequestCost(rng.randint(8, 200), rng.randint(4, 24), 512 if lib else 0)


def warm_up(server: VirtualServer, rounds: int = 6) -> None:
    """Waves of different sizes so every coefficient is seen."""
    rng = random.Random(1)
    for size in (1, 3, 8, 20, 40, 5)[:rounds]:
        for _ in range(size):
            server.submit(mixed_cost(rng))
        server.run_until_idle()


def test_step_model_recovers_coefficients():
    model = StepModel(prior=(0.05, 1.0, 0.1, 0.1, 0.5))  # deliberately wrong prior
    rng = random.Random(0)
    for _ in range(200):
        f = StepFeatures(
            rng.choice([0, rng.randint(1, 4096)]),
            rng.choice([0, rng.randint(1, 2_000_000)]),
            rng.randint(0, 256),
            rng.choice([0, 0, 0, rng.randint(1, 300)]),
        )
        model.observe(f, float(_x(f) @ TRUE))
    np.testing.assert_allclose(model.coef, TRUE, rtol=0.05, atol=1e-3)


def test_step_model_keeps_coefficients_non_negative():
    model = StepModel()
    for n in range(1, 50):  # decode steps that get *faster* with more rows: no negative cost
        model.observe(StepFeatures(num_decode=n), 0.1 - 0.001 * n)
    assert (model.coef >= 0).all()


def test_predicted_ttft_matches_the_scheduler_under_a_burst():
    """No SLO: a burst of 200 mixed requests (more than max_num_seqs, several budget-sized
    prefill steps, library rows) is admitted whole; each prediction, made at admission
    from the learned model, is within tolerance of the first token the scheduler gives."""
    adm = AdmissionController(None, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    server = VirtualServer(adm)
    warm_up(server)
    rng = random.Random(2)
    ids = [server.submit(mixed_cost(rng))[0] for _ in range(200)]
    server.run_until_idle()
    rel = sorted(abs(server.predicted[r] / server.ttft(r) - 1) for r in ids)
    assert server.ttft(ids[-1]) > 10 * server.ttft(ids[0])  # the queue mattered
    assert rel[len(rel) // 2] < 0.1, rel[len(rel) // 2]
    assert rel[int(0.95 * len(rel))] < 0.25, rel[int(0.95 * len(rel))]


@pytest.mark.parametrize(
    "prompt, max_tokens", [((100, 200), 16), ((8, 12), 64)], ids=["prefill-bound", "seq-bound"]
)
def test_burst_rejects_with_retry_after_of_the_drain_time(prompt, max_tokens):
    """SLO 1 s under a burst: admitted requests meet it, the rest are rejected, and the
    predicted drain of each rejection is within 2x of when admission actually reopens,
    and a request admitted then meets the SLO. Prefill-bound: the queue of prompts is the
    wait (it reopens within a step). Seq-bound: short prompts fill all max_num_seqs slots
    and a new request waits for running ones to finish decoding (seconds)."""
    slo = 1.0
    adm = AdmissionController(slo, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    server = VirtualServer(adm)
    warm_up(server)
    rng = random.Random(3)
    t_burst = server.t
    results = [server.submit(RequestCost(rng.randint(*prompt), max_tokens)) for _ in range(300)]
    accepted = [rid for rid, d in results if d.accepted]
    rejected = [d for _, d in results if not d.accepted]
    assert accepted and len(rejected) > 100
    assert all(d.verdict is Verdict.SLO and d.retry_after_s >= 1 for d in rejected)
    assert all(d.retry_after_s == max(1, round(d.drain_s)) for d in rejected)
    assert all(d.predicted_ttft_s > adm.headroom * slo for d in rejected)
    # step until a probe like the rejected ones is admitted (probes that are rejected add
    # nothing); the admitted probe must then meet the SLO
    probe = RequestCost(prompt[1], max_tokens)
    while True:
        t_before = server.t - t_burst  # admission reopened during the step that follows
        server.step()
        rid, d = server.submit(probe)
        if d.accepted:
            break
    t_open = server.t - t_burst
    server.run_until_idle()
    met = sum(server.ttft(r) <= slo for r in accepted)
    assert met >= 0.95 * len(accepted)
    assert server.ttft(rid) <= slo
    drains = [d.drain_s for d in rejected]
    assert all(0.5 * t_before <= x <= 2 * t_open for x in drains), (t_before, t_open, drains)
    if max_tokens == 64:
        assert t_before > 2.0  # a real wait, not one step


def test_queue_full_retry_after_is_the_time_to_drain_below_max_queue():
    adm = AdmissionController(None, 4, limits=EngineLimits(BUDGET, MAX_SEQS))
    load = Load(tuple(RequestCost(400, 8) for _ in range(4)))
    d = adm.decide(RequestCost(10), load)
    assert d.verdict is Verdict.QUEUE_FULL
    one_prefill = adm.step_s(StepFeatures(prefill_tokens=400))
    assert 0 < d.drain_s < 4 * one_prefill * 1.5  # drains as the first request is served
    assert adm.decide(RequestCost(10), Load(load.waiting[:3])).accepted


@pytest.mark.parametrize("slo", [None, 0, 0.0])
def test_no_slo_never_rejects(slo):
    adm = AdmissionController(slo, None)
    huge = Load(tuple(RequestCost(4000, 512) for _ in range(500)))
    d = adm.decide(RequestCost(4000, 512), huge, num_requests=16)
    assert d.accepted and d.retry_after_s == 0
    assert d.predicted_ttft_s > 10  # still predicted (and scored) without an SLO


def test_library_prefill_and_load_are_counted():
    adm = AdmissionController(None, None)
    plain = adm.predict_ttft(RequestCost(200), Load())
    lib = adm.predict_ttft(RequestCost(200, library_attend=2048), Load())
    cold = adm.predict_ttft(RequestCost(200, library_attend=2048, library_load_tokens=8000), Load())
    assert plain < lib < cold
    assert cold - lib == pytest.approx(8000 / adm.load_tps, rel=1e-6)
    adm.observe_library_load(8000, 4.0)  # slower than the prior: the estimate follows
    assert adm.load_tps < 20_000


def test_bad_arguments():
    with pytest.raises(ValueError, match="ttft_slo"):
        AdmissionController(-1.0, None)
    with pytest.raises(ValueError):
        AdmissionController(1.0, 1, prior_load_tps=0)
    with pytest.raises(ValueError):
        AdmissionController(1.0, 1, headroom=0)
    with pytest.raises(ValueError):
        StepModel(prior=(1.0, 2.0))


def test_warmup_and_empty_steps_are_not_folded_in():
    adm = AdmissionController(None, None)
    before = adm.model.coef.copy()
    adm.observe_step(9.0, StepFeatures(num_decode=8), warmup=True)
    adm.observe_step(9.0, StepFeatures())
    adm.observe_step(math.nan, StepFeatures(num_decode=8))
    np.testing.assert_array_equal(adm.model.coef, before)


def test_metrics_exported(fake_server):
    """One request through the server: the prediction error, KV usage, queue length and
    running count are on /metrics; /health reports the queue."""
    url, _, _ = fake_server
    auth = {"Authorization": "Bearer sekret"}
    body = {"model": "fake", "prompt": "hello", "max_tokens": 3}
    with httpx.Client(base_url=url, headers=auth, timeout=30) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        assert c.post("/v1/completions", json=body | {"model": model}).status_code == 200
        text = c.get("/metrics").text
        health = c.get("/health").json()
    for name in (
        "moska_ttft_prediction_error_seconds_count",
        "moska_predicted_ttft_seconds_count",
        "moska_kv_cache_usage",
        "moska_queue_length",
        "moska_running_requests",
    ):
        assert name in text, name
    count = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("moska_ttft_prediction_error_seconds_count")
    )
    assert count >= 1
    assert {"num_waiting", "num_running"} <= health.keys()
