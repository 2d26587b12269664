"""#19: an idle gap between bursts must not reset what the decode side is known to be. The
TPOT factor used to fade to 1 (half-life 5 s): on the CPU trace bench the next burst came
~15 s later, 8 requests were admitted at once at ~1x the step fit, and saw 3-10x. A
constructed timeline on the scheduler alone: a burst whose token windows run ~3x the fit,
a 15 s gap, a second burst on the same decode side."""

from __future__ import annotations

from moska.pd.index import block_hashes
from moska.pd.scheduler import SLO, GlobalScheduler, Instance, Plan, RequestInfo

BS, SEATS, TPOT_SLO = 16, 8, 0.1
SLOW = (2.5, 3.5)  # the first burst's windows, observed over the step fit (mean 3)


def _cluster() -> tuple[GlobalScheduler, Instance]:
    p = Instance("p0", "http://p0", "prefill", 0, BS, 1000, SEATS)
    d = Instance("d0", "http://d0", "decode", 1, BS, 1000, SEATS)
    return GlobalScheduler([p, d], SLO(tpot_s=TPOT_SLO)), d


def _burst_windows(sched: GlobalScheduler, d: Instance, start: float, ratios, seconds: float):
    """4-token windows every 50 ms for `seconds`, at batches 1..SEATS, `ratios` in turn."""
    t, k = start, 0
    while t < start + seconds:
        predicted = 4 * sched.tpot_s(1 + k % SEATS, d)
        sched.observe_tpot(d, ratios[k % len(ratios)] * predicted, predicted, t)
        t, k = t + 0.05, k + 1
    return t


def _admit_burst(sched: GlobalScheduler, d: Instance, now: float) -> list[Plan]:
    """A burst of SEATS requests arriving together (distinct prompts, 24 tokens each)."""
    plans = []
    for i in range(SEATS):
        tokens = [1000 * i + j for j in range(40)]
        plan = sched.plan(RequestInfo(tuple(block_hashes(tokens, BS)), 40, 24), now + 0.01 * i)
        if isinstance(plan, Plan):
            plans.append(plan)
    return plans


def test_idle_gap_keeps_the_decode_side_known():
    sched, d = _cluster()
    end = _burst_windows(sched, d, 0.0, SLOW, 8.0)
    assert 2.5 < sched.tpot_factor(d, end) < 3.5
    gap_end = end + 15.0  # the other system's round: nothing relayed from d
    # fading to 1 it was 1 + 2 * 0.125 = 1.25 here; the long-run memory keeps ~3
    assert sched.tpot_factor(d, gap_end) > 2.5
    plans = _admit_burst(sched, d, gap_end)
    assert plans, "the decode side is slow, not closed: the first requests fit"
    # every admitted request decodes beside all the others: at the decode side's real
    # speed (the first burst's mean, 3x the fit) each must stay within the TPOT SLO
    seen = 3.0 * sched.tpot_s(len(d.active), d)
    assert seen <= TPOT_SLO, (len(plans), seen)
    assert all(p.predicted_tpot_s >= 0.8 * 3.0 * sched.tpot_s(p.batch, d) for p in plans)


def test_recent_windows_take_over_and_a_long_idle_forgets():
    sched, d = _cluster()
    end = _burst_windows(sched, d, 0.0, SLOW, 8.0)
    # the host got faster: after 2 s of windows at 1.5x the factor follows them, not the
    # first burst's upper quantile (only a share of it stays while windows keep coming)
    end = _burst_windows(sched, d, end + 15.0, (1.4, 1.6), 2.0)
    assert 1.5 <= sched.tpot_factor(d, end) < 2.0
    # ten minutes without a window: back at the step fit (a run of rejections ends)
    assert sched.tpot_factor(d, end + 600.0) < 1.01
    assert len(_admit_burst(sched, d, end + 600.0)) == SEATS  # 1x the fit: all fit
