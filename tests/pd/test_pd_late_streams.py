"""#19, session 15: the decode instance counts as slower when most of its streams are late,
not when one is. Every stream on a decode instance shares its steps; one late stream is its
own hiccup. On 2 H200s with 20-27 streams in flight the latest one put the time per token
at ~0.03 s and the front end answered TPOT 429s (8-35 a round) where clients saw p99
0.015-0.02 s."""

from __future__ import annotations

import random

import pytest

from moska.pd.index import block_hashes
from moska.pd.scheduler import SLO, GlobalScheduler, Instance, Plan, RequestInfo

BS = 16
TPOT_SLO = 0.03


def _prompt(seed: int) -> RequestInfo:
    tokens = [random.Random(seed).randrange(1000) for _ in range(64)]
    return RequestInfo(tuple(block_hashes(tokens, BS)), len(tokens), 200)


@pytest.mark.parametrize("late_streams", [1, 12])
def test_one_late_stream_is_not_a_slower_decode_instance(late_streams):
    p = Instance("p0", "http://p0", "prefill", 0, BS, 100_000, 256)
    d = Instance("d0", "http://d0", "decode", 1, BS, 100_000, 256)
    sched = GlobalScheduler([p, d], SLO(tpot_s=TPOT_SLO))
    for s in (p, d):  # an H200-like decode step: ~2 ms + 0.12 ms a row
        sched.set_step_coef(s, [0.002, 0.02, 0.0, 0.012, 0.0])
    plans = [sched.plan(_prompt(k), 0.0) for k in range(20)]
    assert all(isinstance(x, Plan) for x in plans)
    step = sched.tpot_s(20, d)
    now = 1.0
    for k, plan in enumerate(plans):  # their last token events: on time, but a few
        assert isinstance(plan, Plan)
        sched.token_event(plan, d, step, now - (40 * step if k < late_streams else 0.5 * step))
    nxt = sched.plan(_prompt(99), now)
    if late_streams == 1:  # the old rule: 10x the step from one stalled relay, a TPOT 429
        assert isinstance(nxt, Plan), nxt
        assert nxt.predicted_tpot_s < 0.5 * TPOT_SLO
        assert sched.tpot_factor(d, now) == pytest.approx(1.0)
    else:  # most streams late: the instance is slower, for every request
        assert not isinstance(nxt, Plan) and nxt.reason == "tpot", nxt
        assert sched.tpot_factor(d, now) > 5.0
