"""A 429's drain is when admission itself would admit the retry: one arriving during a
long step is predicted at least a quarter of that step still to run, so a drain that
lands in a step's last quarter is that step's end (`retry_drain.first_admit`). Checked
against the controller's own decisions on the same load later in the step (synthetic
steps of the default prior, no clock): milliseconds."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moska.server.admission import AdmissionController, EngineLimits, Load, RequestCost
from moska.server.queue_replay import Prediction
from moska.server.retry_drain import first_admit

BIG = RequestCost(400, 8, library_attend=10000)  # a library prefill step of ~4.1 s
PLAIN = RequestCost(16, 4)  # the retry: its own step takes tens of ms


def _controller(slo: float, budget: int = 4096) -> AdmissionController:
    return AdmissionController(slo, None, limits=EngineLimits(budget, 64))


def _first_admitted(adm: AdmissionController, load: Load, until_s: float) -> float | None:
    """The first time (s from now, 10 ms grid) at which the controller admits PLAIN on
    `load` with the step in progress that much further on; None before `until_s`."""
    for i in range(int(until_s / 0.01) + 1):
        if adm.decide(PLAIN, replace(load, busy_s=load.busy_s + i * 0.01)).accepted:
            return i * 0.01
    return None


@pytest.mark.parametrize("busy_s", [0.5, 1.5, 2.5, 3.0])
def test_a_drain_in_a_steps_last_quarter_is_that_steps_end(busy_s):
    """A plain request behind a 4.1 s library prefill step in progress, SLO 1 s: no retry
    is admitted while the step runs (a quarter of it is more than what fits), so each is
    admitted when it ends, and the drain says so; FIFO alone (TTFT less what fits) said
    up to 3.7x too early."""
    adm = _controller(1.0)
    step_s = adm.step_s(_big_step())
    assert step_s > 4 * adm.fits_s()  # a quarter of the step misses the SLO by itself
    load = Load(waiting=(BIG,), busy_s=busy_s)
    d = adm.decide(PLAIN, load)
    assert not d.accepted
    end_s = step_s - busy_s
    assert _first_admitted(adm, load, end_s - 0.02) is None  # shut through the step
    # at its end the library request decodes: the retry's own step fits
    after = Load(running=((BIG.max_tokens - 1, BIG.library_attend),))
    assert adm.decide(PLAIN, after).accepted
    assert d.drain_s == pytest.approx(end_s, rel=0.02, abs=0.02), (d.drain_s, end_s)
    fifo = adm.predict(PLAIN, load, overdue=False).ttft_s - adm.fits_s()
    if busy_s >= 2.5:
        assert fifo < 0.5 * end_s, (fifo, end_s)


def test_a_drain_early_in_a_step_keeps_the_fifo_time():
    """Two such steps ahead and a 7 s SLO: the retry fits once the first step has run
    2.3 s, well before its last quarter; the drain is that time (FIFO), and the
    controller admits the retry then and not before."""
    adm = _controller(7.0, budget=400)  # one library request per step
    load = Load(waiting=(BIG, BIG), busy_s=0.0)
    d = adm.decide(PLAIN, load)
    assert not d.accepted
    step_s = adm.step_s(_big_step())
    assert d.drain_s < 0.75 * step_s
    seen = _first_admitted(adm, load, step_s)
    assert seen is not None and seen == pytest.approx(d.drain_s, abs=0.02), (seen, d.drain_s)


def test_first_admit_reads_runs_of_equal_steps():
    """Spans of k equal steps: the step a time falls in is found by its index."""
    pred = Prediction(ttft_s=10.0, queue_s=0.0, spans=((0.0, 8.0, 2.0, 4), (8.0, 10.0, 2.0, 1)))
    assert first_admit(pred, 5.0) == 5.0  # in the 3rd step (4-6 s), not its last quarter
    assert first_admit(pred, 4.2) == 6.0  # 5.8 s: the 3rd step's last quarter
    assert first_admit(pred, 12.0) == -2.0  # fits now: no step to wait for


def _big_step():
    from moska.server.step_model import StepFeatures

    return StepFeatures(BIG.prompt_tokens, BIG.prompt_tokens * BIG.library_attend, 0, 0)
