"""#19: a run of TTFT rejections probes even when the learnt stage line is far off (its
mean above PROBE_MAX_SLOS x the SLO) as long as the instances' own step fits put the
request within the SLO; a request the step fits alone put past the SLO is never probed
(once the line has learnt from PROBE_BLIND_REQUESTS: before, any request may probe)."""

from __future__ import annotations

import random

from moska.pd.index import block_hashes
from moska.pd.scheduler import SLO, GlobalScheduler, Instance, Plan, RequestInfo
from moska.pd.ttft_model import PROBE_AFTER_S, PROBE_BLIND_REQUESTS, PROBE_MAX_SLOS

BS = 16


def _sched() -> tuple[GlobalScheduler, Instance]:
    p = Instance("p0", "http://p0", "prefill", 0, BS, 100_000, 64)
    d = Instance("d0", "http://d0", "decode", 1, BS, 100_000, 64)
    return GlobalScheduler([p, d], SLO(ttft_s=1.0)), p


def _prompt(seed: int, n: int = 200) -> RequestInfo:
    rng = random.Random(seed)
    tokens = [rng.randrange(1000) for _ in range(n)]
    return RequestInfo(tuple(block_hashes(tokens, BS)), len(tokens), 20)


def test_a_far_off_stage_line_is_probed_when_the_step_fits_say_it_fits():
    sched, p = _sched()
    for k in range(PROBE_BLIND_REQUESTS - 1):  # past the first requests' blind probes
        b = sched.plan(_prompt(50 + k), 0.0)
        assert isinstance(b, Plan)
        sched.prefill_done(b)
        sched.observe_prefill(b, 0.1, now=0.1)
        sched.finished(b, b.decode)
    a = sched.plan(_prompt(0), 0.1)
    assert isinstance(a, Plan)
    sched.prefill_done(a)
    sched.observe_prefill(a, 8.0, now=8.0)  # a warm-up stall: the line now says ~8 s
    sched.finished(a, a.decode)
    t = 8.0 + PROBE_AFTER_S
    long = _prompt(1, 400)
    while sched.prefill_s(long.prompt_tokens, p) <= 1.2:  # the step fit alone: past the SLO
        long = _prompt(1, 2 * long.prompt_tokens)
    r = sched.plan(long, t)
    assert not isinstance(r, Plan) and r.reason == "ttft" and sched.ttft.probes == 0
    short = _prompt(2)
    probe = sched.plan(short, t)
    assert isinstance(probe, Plan) and sched.ttft.probes == 1
    assert probe.predicted_ttft_s > PROBE_MAX_SLOS * 1.0  # beyond the old mean bound
    nxt = sched.plan(_prompt(3), t + 2 * PROBE_AFTER_S)  # the probe still in flight
    assert not isinstance(nxt, Plan) and sched.ttft.probes == 1


def test_a_probe_rejected_for_tpot_is_no_probe():
    """A request TTFT lets through as a probe but TPOT rejects is not admitted: it neither
    counts as a probe nor takes the probe's turn (the next request may still probe)."""
    p = Instance("p0", "http://p0", "prefill", 0, BS, 100_000, 64)
    d = Instance("d0", "http://d0", "decode", 1, BS, 100_000, 64)
    sched = GlobalScheduler([p, d], SLO(ttft_s=1.0, tpot_s=1e-6))  # TPOT rejects all
    sched.ttft.observe("prefill", "p0", 0.01, 8.0, now=0.0)  # a fit that rejects for TTFT
    t = PROBE_AFTER_S + 0.5
    for seed in range(3):
        r = sched.plan(_prompt(seed), t)
        assert not isinstance(r, Plan) and r.reason == "tpot", r
    assert sched.ttft.probes == 0
