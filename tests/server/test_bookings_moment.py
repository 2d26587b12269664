"""A booked retry at its moment (bookings.py, admission_bookings.py): one that admission
takes only when nothing waits holds its moment alone, one whose first token alone misses
the SLO is served there, a stalled step delays it by its overrun again (not scaled), and
one refused in the route is booked again. Plain Python, no model: milliseconds."""

from __future__ import annotations

import math

import pytest
from test_admission import BUDGET, MAX_SEQS

from moska.server.admission import AdmissionController, EngineLimits, RequestCost
from moska.server.queue_replay import Load
from moska.server.step_model import StepFeatures

# library attends 10x what a CPU step of the same length needed before the step prior's
# library cost fell 10x (session 22): the scenarios keep their step times


def test_a_request_that_misses_the_slo_alone_is_booked_a_moment_alone_and_served():
    """A library prefill on CPU longer than the SLO alone can only be served on an idle
    engine. Session 20 promised it its own drain, unbooked: the booked queue kept the
    engine busy at that moment and every moment after (in a virtual 64-client burst 6 of
    31 library clients were never admitted). Now it is booked behind the queue, holding
    the engine through its first token and decode, and served at its moment when nothing
    waits (it misses the SLO by its own length: no wait would help it)."""
    adm = AdmissionController(1.0, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    now = [0.0]
    adm.clock = lambda: now[0]
    plain, lib = RequestCost(32, 8), RequestCost(200, 8, 15000)
    _, idle_only, alone = adm.pacing(lib)
    assert idle_only and 1.0 < alone < 5.0
    first = adm.book(b"p1", plain, 2.0)
    assert first == 2.0 and adm.book(b"p2", plain, 0.5) > 2.0  # queued behind p1
    moment = adm.book(b"L", lib, 0.5)
    assert moment > 2.0 and adm.bookings.find(b"L", 0.1) is not None
    hold = alone + adm.decode_tail_s(lib)
    assert adm.book(b"p3", plain, 0.1) >= moment + hold  # after its first token and decode
    now[0] = moment
    refused = adm.decide(lib, Load((plain,), ()), key=b"L")  # one waiting: no
    assert not refused.accepted and adm.bookings.counts.rebooked == 1
    now[0] += refused.drain_s  # its new moment (behind p3); then nothing waits
    d = adm.decide(lib, Load((), ((2, 0),)), key=b"L")
    assert d.accepted and d.predicted_ttft_s > 1.0
    assert adm.bookings.counts.rebooked == 1 and adm.bookings.counts.claimed == 1


def test_one_that_misses_the_slo_alone_is_judged_on_the_same_step_times_as_its_ttft():
    """Its own limit is its alone time on the scaled step times plus its wait: compared
    with the unscaled alone time, a slowdown factor of 1.15 or 0.4 s of loop lag refused
    it at every moment with a decode running (review of session 21)."""
    adm = AdmissionController(1.0, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    now = [0.0]
    adm.clock = lambda: now[0]
    lib = RequestCost(200, 8, 15000)
    adm.slow.log_mean = math.log(1.15)
    now[0] += adm.book(b"L", lib, 0.5)
    d = adm.decide(lib, Load((), ((2, 0),)), key=b"L", elapsed_s=0.4)
    assert d.accepted and d.predicted_ttft_s > adm.pacing(lib)[2] + 0.4


def test_one_taken_only_when_nothing_waits_holds_its_moment_alone():
    """A request whose first token alone misses the headroom but fits the SLO (a long
    library prompt) comes after the booked queue, the bookings after it come after its
    first token, and at its moment with nothing waiting it is admitted (not refused for
    the headroom or the library risk, as it was at every moment on the device)."""
    adm = AdmissionController(1.0, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    now = [0.0]
    adm.clock = lambda: now[0]
    plain, mid = RequestCost(32, 8), RequestCost(32, 8, 27500)
    _, idle_only, alone = adm.pacing(mid)
    assert idle_only and adm.headroom * 1.0 < alone <= 1.0
    first = adm.book(b"p1", plain, 1.0)
    moment = adm.book(b"M", mid, 0.2)
    assert moment > first and adm.bookings.find(b"M", 0.0) is not None
    assert adm.book(b"p2", plain, 0.1) >= moment + alone  # after its first token
    now[0] = moment
    adm.bookings.claim(adm.bookings.find(b"p1", moment))  # p1 came and was admitted
    running = Load((), ((4, 0),))  # its decode still running, nothing waiting
    assert not adm.decide(mid, running).accepted  # not booked: the headroom holds
    d = adm.decide(mid, running, key=b"M")
    assert d.accepted and d.predicted_ttft_s > adm.fits_s()
    assert adm.bookings.counts.claimed == 2
    now[0] += adm.book(b"M2", mid, 0.0)  # another like it, booked; at its moment with
    assert not adm.decide(mid, Load((plain,), ()), key=b"M2").accepted  # one waiting: no


def test_a_booked_retry_waits_for_a_stalled_step_once_not_at_its_pace():
    """A step held up by the event loop (a GPU step ~20x its prediction in session 21, a
    CPU burst's first step 2-6x in session 23) scaled a booked retry's whole replay: 2-3
    waiting came to 3.5-9.8 s on the GPU, and 4.4-9.8 s on CPU where the real first
    tokens came in 1-2 s, so retries were refused at their moment. A booked retry's step
    in progress now ends as much again later as it has overrun (the drain's charge); a new
    request's replay is still scaled by the whole overrun, and `booked_overdue` brings
    back session 21's capped scale."""
    adm = AdmissionController(1.0, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    now = [0.0]
    adm.clock = lambda: now[0]
    plain, big = RequestCost(32, 8), RequestCost(BUDGET // 4, 8)
    calm = Load((big,) * 12, ((4, 0),))
    pred = adm.predict(plain, calm)
    assert pred.ttft_s > 2.5 * pred.first_s  # several steps ahead of it
    assert adm.decide(plain, calm).accepted
    stalled = Load(calm.waiting, calm.running, 0, 3.0 * pred.first_s)
    assert not adm.decide(plain, stalled).accepted  # a new request: every step 3x
    now[0] += adm.book(b"k", plain, 0.5)
    d = adm.decide(plain, stalled, key=b"k")
    # the step in progress: a quarter of it still to run (the replay's floor) plus its
    # overrun so far again; the steps after it as predicted
    late = stalled.busy_s - pred.first_s
    expected = pred.ttft_s - pred.first_s + 0.25 * pred.first_s + late
    assert d.accepted and d.predicted_ttft_s == pytest.approx(expected)
    assert adm.bookings.counts.claimed == 1
    adm.booked_overdue = 4.0  # session 21: scaled, at most 4x (here 3x): refused
    now[0] += adm.book(b"k2", plain, 0.5)
    assert not adm.decide(plain, stalled, key=b"k2").accepted


def test_a_booked_retry_plans_with_its_own_factor():
    """A decode tail over the library ran 2.5x the fit: the main factor rises and a new
    request is refused; a booked retry at its moment plans with `booked_slow`, which a
    decode-only step does not raise, and is admitted (its queue is prefill steps)."""
    adm = AdmissionController(1.0, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    now, t = [0.0], [100.0]
    adm.clock = lambda: now[0]
    adm.slow.clock = adm.booked_slow.clock = lambda: t[0]
    prefill, tail = StepFeatures(256, 0, 8, 4), StepFeatures(0, 49_152, 24, 0)
    for features, ratio, n in ((prefill, 1.0, 20), (tail, 2.5, 12)):
        for _ in range(n):
            seconds = ratio * adm.model.step_s(features)
            t[0] += seconds
            adm.observe_step(seconds, features)
    assert adm.slowdown > 2.0 and adm.booked_slow.scale() < 1.1
    plain, big = RequestCost(32, 8), RequestCost(BUDGET // 4, 8)
    load = Load((big,) * 12, ())
    assert not adm.decide(plain, load).accepted
    now[0] += adm.book(b"k", plain, 0.5)
    d = adm.decide(plain, load, key=b"k")
    assert d.accepted and d.predicted_ttft_s < 0.5 * adm.predict(plain, load).ttft_s


def test_a_booked_retry_refused_in_the_route_is_booked_again_and_recorded():
    adm = AdmissionController(1.0, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    now = [0.0]
    adm.clock = lambda: now[0]
    plain = RequestCost(32, 8)
    now[0] += adm.book(b"k", plain, 0.5)
    busy = Load(tuple(RequestCost(400, 8) for _ in range(40)), ())
    d = adm.decide(plain, busy, key=b"k")
    assert not d.accepted and adm.bookings.counts.rebooked == 1
    assert adm.bookings.find(b"k", now[0]).tries == 2  # its new moment is the 429's
    assert d.drain_s == pytest.approx(adm.bookings.find(b"k", now[0]).due - now[0])
    row = adm.bookings.state()["refused_latest"]
    assert len(row) == 11 and row[:2] == [1.0, 0.0] and row[5] == 40  # 1st, route, 40 wait


def test_a_booked_retry_is_admitted_within_its_own_share_of_the_slo():
    """`booked_headroom`: a booked retry at its moment is admitted within that share of the
    SLO from its moment on (None, the default: `headroom`'s), a new request and one in the
    early window before its moment within `headroom`'s (0.85). On CPU plain bursts booked
    retries were refused at their moment predicted 4.24-4.78 s against 4.25 s admitted
    (SLO 5 s) and booked again behind the whole queue (session 24)."""
    load = Load((RequestCost(64, 8),) * 23, ((4, 0),) * 8)
    plain = RequestCost(32, 8)
    for share, admitted in ((None, False), (0.925, True)):  # None: `headroom` (0.85)
        adm = AdmissionController(1.0, None, limits=EngineLimits(BUDGET, MAX_SEQS))
        adm.booked_headroom = share
        now = [0.0]
        adm.clock = lambda now=now: now[0]
        ttft = adm.predict(plain, load).ttft_s
        assert 0.85 < ttft < 0.925  # over `headroom`, within 0.925
        assert not adm.decide(plain, load).accepted  # a new request: `headroom`'s
        moment = adm.book(b"p", plain, 0.4)
        now[0] = moment - 0.05  # in the early window (from 0.75 of the wait): as new
        assert not adm.decide(plain, load, key=b"p").accepted
        assert adm.bookings.counts.early == 0 and adm.bookings.counts.rebooked == 1
        # the booked again retry at its moment, a hair early (a client's rounded timer)
        now[0] = adm.bookings.find(b"p", now[0]).due - 0.002
        d = adm.decide(plain, load, key=b"p")
        assert d.accepted is admitted
        assert adm.bookings.counts.rebooked == (1 if admitted else 2)


def test_a_retry_is_early_or_on_time_by_when_it_was_sent_with_booked_by_send():
    """`booked_by_send`: a retry sent at half its wait but decided past its moment (it
    waited for the event loop) is early, told what is left from now; one sent on time is
    on time however long it waited. Off (the default): judged when decided."""
    plain = RequestCost(32, 8)
    for by_send in (False, True):
        adm = AdmissionController(1.0, None, limits=EngineLimits(BUDGET, MAX_SEQS))
        adm.booked_by_send = by_send
        now = [0.0]
        adm.clock = lambda now=now: now[0]
        moment = adm.book(b"p", plain, 0.8)
        now[0] = moment + 0.05  # decided past its moment, sent at half its wait
        booking, early = adm.booked(b"p", waited_s=moment / 2 + 0.05)
        assert booking is not None
        if by_send:
            assert early is not None and early.drain_s == 0.0  # past due now: nothing left
        else:
            assert early is None
        now[0] = moment * 0.6  # decided early, sent earlier still: early either way
        _, early = adm.booked(b"p", waited_s=0.1)
        left = moment - now[0]
        assert early is not None and early.drain_s == pytest.approx(left)
        now[0] = moment + 0.3  # sent at its moment, waited 0.3 s: on time either way
        assert adm.booked(b"p", waited_s=0.3)[1] is None
