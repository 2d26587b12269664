"""#19: the front end's TTFT admission on a constructed timeline (plain Python, simulated
clock): a prefill instance that serves its queue in order, slower than its step fit and
with a fixed cost per request, and a decode instance whose first token comes later the
larger its batch. Under an overload the scheduler must reject request by request (the
work on the live queue), not whole seconds of requests, and what it admits must meet the
SLO. The old feed, one observed/predicted ratio per stage multiplying the whole stage,
learnt ~10x from a few late first tokens at a large batch and then rejected every request
for seconds (see the commit)."""

from __future__ import annotations

import heapq
import random

import pytest

from moska.pd.index import block_hashes
from moska.pd.scheduler import SLO, GlobalScheduler, Instance, Plan, RequestInfo
from moska.pd.stage_fit import StageFit
from moska.pd.token_times import WINDOW
from moska.pd.ttft_model import PROBE_AFTER_S

BS = 16
SLO_S = 1.0


def _feed_new(sched, plan, kind, seconds, now):
    if kind == "prefill":
        sched.observe_prefill(plan, seconds, now)
    else:
        sched.observe_first(plan, plan.decode, seconds, now)


def simulate(feed=_feed_new, rate=15.0, duration_s=8.0, seed=0):
    """Poisson arrivals of 200-token prompts; returns [(arrival, admitted, true TTFT)].
    The host: the prefill instance's work runs 1.5x its step fit, one request after
    another, and each request pays 0.15 s besides (HTTP hops, event loops); the first
    token comes 0.04 s + 0.035 s per request decoding there after the KV arrived."""
    insts = [Instance("p0", "http://p0", "prefill", 0, BS, 100_000, 64)]
    insts.append(Instance("d0", "http://d0", "decode", 1, BS, 100_000, 64))
    sched = GlobalScheduler(insts, SLO(ttft_s=SLO_S))
    rng = random.Random(seed)
    events: list = []
    t, n = 0.0, 0
    while t < duration_s:
        t += rng.expovariate(rate)
        heapq.heappush(events, (t, n, "arrive", None))
        n += 1
    free_at, decoding, out = 0.0, 0, []
    while events:
        now, k, kind, data = heapq.heappop(events)
        if kind == "arrive":
            tokens = [rng.randrange(1000) for _ in range(200)]
            req = RequestInfo(tuple(block_hashes(tokens, BS)), len(tokens), 20)
            plan = sched.plan(req, now)
            if not isinstance(plan, Plan):
                out.append([now, False, None])
                continue
            out.append([now, True, None])
            free_at = max(now, free_at) + 1.5 * sched.prefill_s(200, insts[0])
            heapq.heappush(events, (free_at + 0.15, k, "staged", (plan, now, len(out) - 1)))
        elif kind == "staged":
            plan, admitted_at, row = data
            sched.prefill_done(plan)
            feed(sched, plan, "prefill", now - admitted_at, now)
            first_at = now + 0.04 + 0.035 * decoding
            out[row][2] = first_at - admitted_at
            heapq.heappush(events, (first_at, k, "first", (plan, now)))
        elif kind == "first":
            plan, sent_at = data
            feed(sched, plan, "first", now - sent_at, now)
            decoding += 1
            heapq.heappush(events, (now + 20 * 0.03, k, "done", plan))
        else:
            decoding -= 1
            sched.finished(data, data.decode)
    return out


def test_overload_rejects_requests_not_seconds():
    out = simulate()
    admitted = [ttft for _, ok, ttft in out if ok]
    within = sum(1 for ttft in admitted if ttft <= SLO_S) / len(admitted)
    assert within >= 0.95, within
    assert len(admitted) >= 0.35 * len(out), (len(admitted), len(out))  # it does reject some
    assert len(admitted) < 0.9 * len(out)
    # every second of the overload admits some: no whole stretch is turned away
    for second in range(1, 8):
        assert any(ok for t, ok, _ in out if second <= t < second + 1), second


def test_stage_fit_learns_fixed_and_per_work_parts():
    fit = StageFit()
    rng = random.Random(1)
    for i in range(200):  # seconds = 0.2 + 2x, with noise
        x = rng.uniform(0.0, 0.5)
        fit.observe(x, 0.2 + 2.0 * x + rng.gauss(0.0, 0.01), now=i * 0.05)
    a, b = fit.coef(10.0)
    assert a == pytest.approx(0.2, abs=0.03) and b == pytest.approx(2.0, rel=0.1)
    assert 0.003 < fit.spread(10.0) < 0.03  # the residuals above the line only
    high = fit.spread(10.0)
    fit.observe(0.25, 0.2, now=10.0)  # far shorter than predicted (0.7): no wider margin
    assert fit.spread(10.0) <= high
    assert fit.upper(0.1, 10.0, 1.0) > fit.predict(0.1, 10.0)
    # no new observation for minutes (a run of rejections): back to the prior, the fit
    later = fit.coef(10.0 + 600.0)
    assert later[0] < 0.01 and later[1] == pytest.approx(1.0, abs=0.05)
    fit.observe(float("nan"), 1.0, 700.0)  # ignored
    assert fit.coef(700.0) == pytest.approx(later, abs=1e-3)


def _pair(**slo):
    p = Instance("p0", "http://p0", "prefill", 0, BS, 100_000, 64)
    d = Instance("d0", "http://d0", "decode", 1, BS, 100_000, 64)
    return GlobalScheduler([p, d], SLO(**slo)), p, d


def _prompt(seed):
    tokens = [random.Random(seed).randrange(1000) for _ in range(200)]
    return RequestInfo(tuple(block_hashes(tokens, BS)), len(tokens), 20)


def test_a_late_token_in_flight_counts_before_its_window_ends():
    """The decode side slows at once: a stream's next token is already later than a
    window's worth of its steps. The next request must be predicted at that, not at what
    the last finished window said (before: admitted at ~0.02 s per token, then ~0.1 seen)."""
    sched, _, d = _pair(tpot_s=0.1)
    a = sched.plan(_prompt(0), 0.0)
    assert isinstance(a, Plan) and a.predicted_tpot_s < 0.05
    step = sched.tpot_s(1, d)
    sched.token_event(a, d, step, now=0.2)  # its first token
    before = sched.plan(_prompt(1), 0.2 + WINDOW * step)  # on time so far: admitted
    assert isinstance(before, Plan), before
    sched.finished(before, d)
    t = 0.2 + 6 * WINDOW * step  # no next token after 6 windows' worth of steps
    late = sched.plan(_prompt(2), t)
    assert not isinstance(late, Plan) and late.reason == "tpot", late
    assert sched.tpot_factor(d, t) == pytest.approx(6.0)
    sched.finished(a, d)  # the stream ended: nothing late any more
    assert sched.tpot_factor(d, t) == 1.0


def test_a_prefill_past_its_predicted_stage_slows_the_next_prediction():
    sched, _, _ = _pair(ttft_s=1.0)
    a = sched.plan(_prompt(0), 0.0)
    assert isinstance(a, Plan)
    on_time = sched.plan(_prompt(1), 0.5 * a.predicted_stage_s)
    assert isinstance(on_time, Plan)
    sched.prefill_done(on_time)
    sched.finished(on_time, on_time.decode)
    t = 6 * a.predicted_stage_s  # `a` still prefilling: the instance runs >= 6x slower
    late = sched.plan(_prompt(2), t)
    assert not isinstance(late, Plan) and late.reason == "ttft", late
    assert late.predicted_ttft_s > 5 * on_time.predicted_stage_s
    sched.prefill_done(a)
    assert isinstance(sched.plan(_prompt(3), t), Plan)


def test_a_run_of_ttft_rejections_probes_one_request_at_a_time():
    """A fit learnt at a slow moment (here: one stage of 1.5 s) rejects every request, and
    with nothing admitted nothing can unlearn it (a bench run rejected all 240): once the
    prefill instance has been idle for PROBE_AFTER_S one request goes through, one only."""
    sched, _, _ = _pair(ttft_s=1.0)
    a = sched.plan(_prompt(0), 0.0)
    assert isinstance(a, Plan)
    sched.prefill_done(a)
    sched.observe_prefill(a, 1.5, now=1.5)  # slow: the fit now predicts ~1.5 s
    sched.finished(a, a.decode)
    r = sched.plan(_prompt(1), 1.5)  # just learnt: no probe yet
    assert not isinstance(r, Plan) and r.reason == "ttft" and r.predicted_ttft_s > 1.0
    t = 1.5 + PROBE_AFTER_S
    probe = sched.plan(_prompt(2), t)
    assert isinstance(probe, Plan) and sched.ttft.probes == 1
    nxt = sched.plan(_prompt(3), t + 2 * PROBE_AFTER_S)  # the probe still in flight
    assert not isinstance(nxt, Plan) and nxt.reason == "ttft"
    sched.prefill_done(probe)
    sched.observe_prefill(probe, 0.1, now=t + 0.1)  # the host is fast again
    sched.finished(probe, probe.decode)
    # it beat its prediction well within the SLO: the next request at the idle instance
    # probes at once (session 15: a probe a second kept 2 H200s locked out 1.5-2 s)
    after = sched.plan(_prompt(4), t + 0.1)
    assert isinstance(after, Plan) and after.predicted_ttft_s < 0.8 * r.predicted_ttft_s
    assert sched.ttft.probes == 2
    sched.prefill_done(after)
    sched.observe_prefill(after, 1.5, now=t + 1.6)  # slow again: the wait is back
    sched.finished(after, after.decode)
    again = sched.plan(_prompt(5), t + 1.6)
    assert not isinstance(again, Plan) and again.reason == "ttft" and sched.ttft.probes == 2
