"""#19, session 15: a run of TTFT rejections at an idle prefill instance probes after one
TTFT SLO of quiet when that is sooner than PROBE_AFTER_S. On 2 H200s (TTFT SLO 0.3 s) a
burst after an idle gap taught the stage line ~0.1 s of fixed cost and its spread, and the
front end rejected every request at an idle prefill instance for 1.5-2 s at 80-100 req/s
(0.32 s predicted at the upper end, 0.04-0.07 s seen at idle), one probe a second."""

from __future__ import annotations

import random

import pytest

from moska.pd.index import block_hashes
from moska.pd.scheduler import SLO, GlobalScheduler, Instance, Plan, RequestInfo
from moska.pd.ttft_model import PROBE_AFTER_S, PROBE_AFTER_SLOS

BS = 16
SLO_S = 0.3


def _prompt(seed: int) -> RequestInfo:
    tokens = [random.Random(seed).randrange(1000) for _ in range(400)]
    return RequestInfo(tuple(block_hashes(tokens, BS)), len(tokens), 16)


def _serve(sched: GlobalScheduler, plan: Plan, stage_s: float, first_s: float, now: float):
    sched.prefill_done(plan)
    sched.observe_prefill(plan, stage_s, now)
    sched.observe_first(plan, plan.decode, first_s, now)
    sched.finished(plan, plan.decode)


# (the burst's stages, within how long of the lock-out's start ordinary admissions resume):
# a probe after one SLO of quiet (0.18 s: 0.40 s; a probe a second: 0.75 s) and, while the
# probes beat their predictions, the next at once (0.25 s: 0.75 s; else 1.95 s; 2.8 s)
@pytest.mark.parametrize(("burst_s", "within_s"), [(0.18, 2 * SLO_S), (0.25, PROBE_AFTER_S)])
def test_an_idle_lock_out_is_probed_after_one_slo_and_unlearnt(burst_s, within_s):
    p = Instance("p0", "http://p0", "prefill", 0, BS, 100_000, 64)
    d = Instance("d0", "http://d0", "decode", 1, BS, 100_000, 64)
    sched = GlobalScheduler([p, d], SLO(ttft_s=SLO_S))
    for s in (p, d):  # a fast GPU's step fits: ~0.01 s for the prompt
        sched.set_step_coef(s, [0.001, 0.02, 0.0, 0.2, 0.0])
    t, seed = 0.0, 0
    for _ in range(6):  # served at idle: ~0.05 s + ~0.03 s
        plan = sched.plan(_prompt(seed := seed + 1), t)
        assert isinstance(plan, Plan), plan
        _serve(sched, plan, 0.05, 0.03, t + 0.08)
        t += 0.1
    burst = [sched.plan(_prompt(seed := seed + 1), t) for _ in range(4)]
    for b in burst:  # a slow burst after an idle gap
        assert isinstance(b, Plan)
        _serve(sched, b, burst_s, 0.06, t + burst_s)
    t += burst_s
    first = sched.plan(_prompt(seed := seed + 1), t)  # idle now, but predicted past the SLO
    assert not isinstance(first, Plan) and first.reason == "ttft", first
    wait = min(PROBE_AFTER_S, PROBE_AFTER_SLOS * SLO_S)
    assert wait < PROBE_AFTER_S  # the old rule: a probe a second
    early = sched.plan(_prompt(seed := seed + 1), t + 0.5 * wait)
    assert not isinstance(early, Plan) and sched.ttft.probes == 0
    now = t + wait + 1e-6
    probe = sched.plan(_prompt(seed := seed + 1), now)
    assert isinstance(probe, Plan) and sched.ttft.probes == 1
    # then 80 req/s, every admitted one served as idle requests are (0.05 s + 0.03 s): the
    # probes unlearn the burst and ordinary admissions resume
    inflight, ordinary = [(probe, now + 0.08)], None
    while now < t + within_s and ordinary is None:
        for plan, end in [x for x in inflight if x[1] <= now]:
            _serve(sched, plan, 0.05, 0.03, end)
            inflight.remove((plan, end))
        before = sched.ttft.probes
        nxt = sched.plan(_prompt(seed := seed + 1), now)
        if isinstance(nxt, Plan):
            ordinary = now if sched.ttft.probes == before else None
            inflight.append((nxt, now + 0.08))
        now += 0.0125
    assert ordinary is not None, sched.ttft.probes
