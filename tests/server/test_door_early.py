"""Session 18's door changes (door_early.py): the library requests admitted ahead count in
a door drain, and the door refuses on arrival a request that would be refused after its
wait, with a drain that covers that wait; off, both are as before; SLO off never rejects."""

from __future__ import annotations

import time

import pytest

from moska.server.admission import AdmissionController, Load, RequestCost
from moska.server.door_early import door_probe, library_admits
from moska.server.queue_replay import Prediction

# the library request attends 10x what a CPU step of its length needed before the step
# prior's library cost fell 10x (session 22)
PLAIN, LIBRARY = RequestCost(64, 16), RequestCost(48, 16, 20480)
IDLE = Load((), (), 0, 0.0)
BUSY = Load((RequestCost(200, 16),) * 6, ((12, 0),) * 8, 0, 0.05)


def with_mix(library_ahead: bool, inside: int = 40) -> AdmissionController:
    """A controller that has decided a half-library mix and has `inside` past its door."""
    adm = AdmissionController(5.0, None)
    adm.door_library = library_ahead
    for cost in [LIBRARY, PLAIN] * 20:
        adm.library_requests.observe(cost, 400 if cost.library_attend else None)
    adm.door.inside = inside
    return adm


def test_a_library_door_drain_counts_the_library_requests_admitted_ahead():
    """Half of the 40 inside name the library; admission admits some of them into the
    burst's first step, and a library 429 at the door waits for their prefill too. Counting
    only the plain ones (before) promises the door's wait alone."""
    off, on = with_mix(False), with_mix(True)
    fits = on.fits_s()
    assert off._door_admits(IDLE, fits) == on._door_admits(IDLE, fits) > 0  # plain: same
    lib_off = off._drain(LIBRARY, IDLE, at_door=True)[1]
    lib_on = on._drain(LIBRARY, IDLE, at_door=True)[1]
    assert on._lib_memo is not None and on._lib_memo[1] >= 1  # library ones admitted ahead
    # a good part of a library prefill more (a retry is admitted once its own TTFT fits)
    one = on.predict(LIBRARY, IDLE, overdue=False).first_s
    assert lib_on >= lib_off + 0.5 * one
    empty = with_mix(True, inside=0)  # nobody inside: no library request ahead
    empty._drain(LIBRARY, IDLE, at_door=True)
    assert empty._lib_memo is None


def test_library_admits_is_the_prefix_that_fits():
    """Against a stub replay whose TTFT grows by 1 s a library request and 0.1 s a plain
    one ahead: with fits 4.5 s and risk 1.5 (3 s before risk) and plain ones interleaved
    one per library one, the j-th library request waits (j - 1) + 0.1 j s: j = 2 fits
    (1.2 s), j = 3 (2.3 s) too, j = 4 (3.4 s) does not."""

    def predict(new: RequestCost, load: Load, n: int = 1, **_: object) -> Prediction:
        lib = sum(1 for c in load.waiting if c.library_attend)
        t = lib * 1.0 + (len(load.waiting) - lib) * 0.1
        return Prediction(ttft_s=t, queue_s=t)

    n = library_admits(predict, LIBRARY, PLAIN, IDLE, 20, 20, 0.5, 4.5, risk=1.5)
    assert n == 3
    assert library_admits(predict, LIBRARY, PLAIN, IDLE, 0, 20, 0.5, 4.5, risk=1.5) == 4
    assert library_admits(predict, LIBRARY, PLAIN, IDLE, 20, 0, 0.5, 4.5) == 0


def test_the_early_door_refuses_what_would_be_refused_after_its_wait():
    """A 4 s storm of connections ahead: the smallest request fits after the requests
    inside (the door before lets it in), but a typical request decided after the storm
    misses the SLO (a late 429 that a fresh retry beats). The early door refuses it on
    arrival, and its drain (the storm anchor's: until the storm's end) covers the part of
    that wait over the SLO."""
    for early in (False, True):
        adm = AdmissionController(5.0, None)
        adm.door_early = early
        adm.door.storm_s, adm.door.storm_until = 4.0, time.monotonic() + 4.0
        d = adm.shed(BUSY)
        late = adm.decide(PLAIN, BUSY, elapsed_s=4.0)  # what it meets after the storm
        assert not late.accepted
        if not early:
            assert d is None  # let through, to be refused after waiting
            continue
        assert d is not None and not d.accepted
        over = adm.predict_ttft(PLAIN, BUSY) + 4.0 - adm.fits_s()
        assert d.drain_s >= over - 1e-9 > 0


def test_the_early_door_lets_in_what_fits_and_slo_off_never_rejects():
    adm = AdmissionController(5.0, None)
    adm.door_early = adm.door_library = True
    adm.door.storm_s = 0.5
    assert adm.shed(BUSY) is None  # a typical request after 0.5 s still fits
    assert adm.decide(PLAIN, BUSY, elapsed_s=0.5).accepted
    off = AdmissionController(0, None)  # `--ttft-slo 0`
    off.door_early = off.door_library = True
    off.door.inside, off.door.storm_s = 400, 30.0
    heavy = Load((RequestCost(4000, 16),) * 40, ((12, 0),) * 8, 0, 3.0)
    assert off.shed(heavy) is None
    assert off.decide(LIBRARY, heavy).accepted


def test_door_probe():
    assert door_probe(False, PLAIN, 0.1, 0.2, 3.0) == (RequestCost(1, 1), pytest.approx(0.3))
    assert door_probe(True, PLAIN, 0.1, 0.2, 3.0) == (PLAIN, pytest.approx(3.3))


def test_the_early_door_counts_ahead_only_those_admission_will_admit():
    """80 inside, half of them library requests that admission mostly refuses under the
    queue: the door before counted all 80 as typical plain requests ahead and refused a
    request that admission would take; the early door counts those the drains count
    (the plain ones admitted and the library ones admitted) and lets it in."""
    for early in (False, True):
        adm = with_mix(False, inside=80)
        adm.door_early = early
        ahead = adm._door_ahead(BUSY, adm.fits_s(), adm._typical_cost())
        assert len(ahead.waiting) < len(BUSY.waiting) + 80
        assert (adm.shed(BUSY) is None) is early
    adm = with_mix(False, inside=80)
    adm.door_early = adm.door_all = True  # the A/B form: behind all inside, as before
    assert adm.shed(BUSY) is not None


def test_plain_drains_do_not_count_the_library_requests_ahead():
    """Any time added to plain door promises lowered their score on session 18's device
    bursts: the library requests admitted ahead go into library drains and the early
    door's probe only."""
    adm = with_mix(True)
    typical = adm._typical_cost()
    with_lib = adm._door_ahead(IDLE, adm.fits_s(), typical, True)
    plain = adm._door_ahead(IDLE, adm.fits_s(), typical, False)
    assert any(c.library_attend for c in with_lib.waiting)
    assert not any(c.library_attend for c in plain.waiting) and plain.waiting
