"""The door's time per answer under a storm is the storm's loop time over its answers, so
one window with a pause in it (a GIL stall) does not set the rate of the whole storm
(door_backlog.DoorBacklog, session 16), and a door 429 leaves the storm out of its promise
by default. A fake clock and count: milliseconds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moska.server.door_backlog import DoorBacklog


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _storm(rate: str, waiting: int = 800) -> tuple[DoorBacklog, Clock, list[int], float]:
    """A storm answered at 0.35 ms a connection, 60 per 21 ms window, but for one window of
    0.25 s that answers 8 (the engine thread holding the GIL); returns the backlog, its
    clock, the count left, and the whole storm's true time per answer so far."""
    clock, left = Clock(), [waiting]
    b = DoorBacklog(prior_answer_s=0.001, recount_s=0.02, clock=clock)
    b.rate = rate
    b.count = lambda: left[0]
    b.backlog()
    spent = answered = 0
    for window in range(8):
        n, dt = (8, 0.25) if window == 2 else (60, 0.021)
        for _ in range(n):
            b.answered()
        left[0] -= n
        clock.t += dt
        spent, answered = spent + dt, answered + n
        b.backlog()
    return b, clock, left, spent / answered


def test_one_paused_window_does_not_set_the_storm_rate():
    b, _, left, true = _storm("sums")
    assert true == pytest.approx(0.00093, rel=0.05)
    # the storm's own rate (with the 1 ms prior worth 16 answers)
    assert b.answer_s == pytest.approx(true, rel=0.05)
    assert b.storm_s() == pytest.approx(left[0] * true, rel=0.1)
    old, *_ = _storm("mean")  # the moving average of the windows' ratios
    assert old.answer_s > 4 * true, old.answer_s


def test_a_storm_over_leaves_its_rate_as_the_next_prior():
    b, clock, left, true = _storm("sums")
    left[0] = 0  # answered: the next count ends the storm
    clock.t += 0.05
    b.backlog()
    assert b._prior_s == pytest.approx(true, rel=0.1)
    left[0] = 600  # the next storm starts from it, not from the 1 ms prior
    clock.t += 5.0
    b.backlog()
    for _ in range(10):
        b.answered()
    left[0] -= 10
    clock.t += 0.021
    b.backlog()
    assert b.answer_s == pytest.approx((16 * b._prior_s + 0.021) / 26, rel=1e-6)


def test_a_door_429_leaves_the_storm_out_by_default():
    """A retry sent during a storm waits it out in the server (on the device's idle cores,
    probes sent during a 1,000-client storm were admitted once the loop reached them), so
    by default a door 429 promises admission's drain alone, not the connections ahead."""
    from test_admission_door_storm import _call, _door_app

    from moska.server.admission import AdmissionController
    from moska.server.load_shedding import LoopLag

    adm = AdmissionController(5.0, None)
    assert adm.door_storm is False and adm.door_lag is True
    adm.bookings.enabled = False  # the same body twice: no booking (test_bookings_server)
    state = SimpleNamespace(loop_lag=LoopLag(), admission=adm)
    app = SimpleNamespace(state=SimpleNamespace(moska=state))
    assert int(_call(_door_app(0.24, 500, 0.002), app)["retry-after-ms"]) == 240
    adm.door_storm = True  # the A/B's on arm (`moska bench load --door-storm on`)
    assert int(_call(_door_app(0.24, 500, 0.002), app)["retry-after-ms"]) > 1000
