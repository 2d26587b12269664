"""The slowdown factor shrugs off a lone slow step (the first after an idle gap, or any
other one the next step does not confirm), and the front door, deciding on a burst before
its first step starts, plans with the overrun that post-idle steps showed (`slowdown.py`).
Synthetic timelines on a virtual clock: milliseconds."""

from __future__ import annotations

from functools import partial

from test_admission import BUDGET, MAX_SEQS, VirtualServer, warm_up

from moska.server.admission import AdmissionController, EngineLimits, Load
from moska.server.retry_drain import door_admits
from moska.server.step_model import StepFeatures

STEP = StepFeatures(prefill_tokens=256, num_decode=8, num_added=4)


def _timeline(adm: AdmissionController) -> list[float]:
    clock = [100.0]
    adm.slow.clock = lambda: clock[0]
    return clock


def _step(adm: AdmissionController, clock: list[float], ratio: float, gap: float = 0.0) -> None:
    clock[0] += gap
    seconds = ratio * adm.model.step_s(STEP)
    clock[0] += seconds
    adm.observe_step(seconds, STEP)


def test_a_post_idle_spike_leaves_the_factor_and_a_real_slowdown_moves_it():
    """Steady steps (+-10%), then an idle gap and a first step 10x its prediction (as at
    300 clients on CPU): the factor stays near 1 through it and the steps after. The old
    moving average jumped to 3.2 and took 6 steps to fall under 1.5. A lone 10x step
    without a gap that the next one does not confirm is dropped too; a machine that does
    slow down 4x is followed within a few steps."""
    adm = AdmissionController(5.0, None)
    clock = _timeline(adm)
    for i in range(30):
        _step(adm, clock, 1.1 if i % 2 else 0.9)
    base = adm.slowdown
    assert 1.0 < base < 1.3
    _step(adm, clock, 10.0, gap=5.0)  # the burst's first step after 5 s idle
    assert adm.slowdown < 1.3 * base, adm.slowdown
    for i in range(3):
        _step(adm, clock, 1.1 if i % 2 else 0.9)
        assert adm.slowdown < 1.3 * base, adm.slowdown
    assert adm.slow.cold() > 2.0  # learned apart: what the door plans with
    _step(adm, clock, 10.0)  # a lone spike mid-burst, not confirmed
    _step(adm, clock, 1.0)
    assert adm.slowdown < 1.3 * base, adm.slowdown
    for _ in range(4):  # the machine slows down 4x for good
        _step(adm, clock, 4.0)
    assert adm.slowdown > 2.5, adm.slowdown


def test_the_door_counts_ahead_what_admission_takes_under_the_first_steps_overrun():
    """Bursts after idle gaps whose first step ran 5x its prediction teach the overrun;
    then 200 requests are inside the door of an idle engine. The door's count of those
    admission will take ahead (it decides before the burst's first step starts) is about
    what admission takes while that step runs 5x (scaled by the overrun, `Load.busy_s`).
    Here 18 for 18; without the overrun 32 (the old controller: 32 for 11; at 300
    clients on CPU, 48 for 30)."""
    adm = AdmissionController(None, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    server = VirtualServer(adm)
    warm_up(server)
    adm.ttft_slo = 3.0
    clock = _timeline(adm)
    for _ in range(4):
        _step(adm, clock, 5.0, gap=10.0)
        for _ in range(3):
            _step(adm, clock, 1.0)
    typical, fits = adm._typical_cost(), adm.fits_s()
    tickets = [adm.door.enter() for _ in range(200)]
    clock[0] += 10.0  # idle since
    door = adm._door_admits(Load(), fits)
    first = adm.predict(typical, Load()).first_s
    running = Load((typical,), busy_s=5.0 * first)  # the burst's first step, 5x past
    took = door_admits(adm.predict, typical, running, 200, fits)
    old = door_admits(partial(adm.predict, cold=False), typical, Load(), 200, fits)
    assert 0.75 * took <= door <= 1.25 * took + 1, (door, took)
    assert old > 1.5 * took, (old, took)
    for t in tickets:
        adm.door.leave(t)
