"""`Bookings.rebook_within`: a booked retry refused at its moment is booked again no later
than that many times its first promise from its first 429 (unless its own drain is later),
instead of behind every booking made since; off (None), it goes behind them all."""

from __future__ import annotations

import pytest

from moska.server.bookings import Bookings
from moska.server.queue_replay import RequestCost

C = RequestCost(64, 8)


def _queue(within: float | None) -> Bookings:
    b = Bookings(rebook_within=within)
    assert b.book(b"first", 0.0, 1.0, C) == 1.0  # its first promise: 1 s
    for i in range(20):  # 20 more booked behind it, 0.5 s apart: the tail at ~11 s
        b.book(f"k{i}".encode(), 0.0, 1.0, C, spacing_s=0.5)
    return b


@pytest.mark.parametrize("within", [None, 2.0])
def test_a_refused_retry_goes_behind_the_queue_or_within_twice_its_first_promise(within):
    b = _queue(within)
    promise = b.book(b"first", 1.0, 0.2, C, spacing_s=0.5)  # refused at its moment
    if within is None:
        assert promise > 9.0  # behind the 20 booked after it
    else:
        assert promise == pytest.approx(1.0)  # at 0 + 2 x 1 s, its own 0.2 s permitting
    got = b.find(b"first", 1.5)
    assert got is not None and got.tries == 2 and got.due == pytest.approx(1.0 + promise)
    assert (got.origin, got.first_s) == (0.0, 1.0)  # the first 429's, kept


def test_its_own_drain_still_comes_first_and_the_limit_counts_from_the_first_429():
    b = _queue(2.0)
    assert b.book(b"first", 1.0, 3.0, C, spacing_s=0.5) == pytest.approx(3.0)  # own drain
    # refused again at 4 s: the limit (0 + 2 x 1 s) has passed, so its own drain, 0.3 s
    assert b.book(b"first", 4.0, 0.3, C, spacing_s=0.5) == pytest.approx(0.3)
    got = b.find(b"first", 4.1)
    assert got is not None and got.tries == 3 and got.origin == 0.0


def test_space_by_booked_spreads_the_moments_by_the_booked_factor():
    from test_admission import MAX_SEQS, VirtualServer, warm_up

    from moska.server.admission import AdmissionController, EngineLimits

    adm = AdmissionController(5.0, None, limits=EngineLimits(max_num_seqs=MAX_SEQS))
    warm_up(VirtualServer(adm))
    adm.front_s = 0.0  # the engine's gap alone, not the event loop's
    plain = adm.gap_s(C)
    assert plain > 0
    for _ in range(8):  # steps at twice the fit: the booked retries' factor rises
        adm.booked_slow.observe(2.0, 0.01)
    factor = adm.booked_slow.scale()
    assert factor > 1.5
    assert adm.gap_s(C) == pytest.approx(plain)  # off: the fit alone
    adm.space_by_booked = True
    assert adm.gap_s(C) == pytest.approx(plain * factor)


def test_space_by_booked_is_on_for_a_cpu_engine_only():
    """The server's default (`spaced_by_default`, set by `create_app`)."""
    from types import SimpleNamespace

    import torch
    from fake_engine import FakeEngine

    from moska.server.admission import AdmissionController
    from moska.server.admission_bookings import spaced_by_default
    from moska.server.app import create_app

    assert spaced_by_default(SimpleNamespace(device=torch.device("cpu")))
    assert spaced_by_default(SimpleNamespace())  # no device: as a CPU one
    assert not spaced_by_default(SimpleNamespace(device="cuda:0"))
    engine = FakeEngine()
    assert create_app(engine).state.moska.admission.space_by_booked
    engine.device = torch.device("cuda", 0)  # the app touches no tensor of it
    assert not create_app(engine).state.moska.admission.space_by_booked
    given = AdmissionController(5.0, None)  # an admission handed in keeps its own setting
    assert not create_app(FakeEngine(), admission=given).state.moska.admission.space_by_booked
