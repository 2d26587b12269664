"""A 429's drain when the step in progress is starved by the door's storm (storm_anchor):
the step ends with the storm, each 429 counts down to that moment by its place in the
storm, and a memoized door rejection counts down too; off, the drain is as before."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest

from moska.server import storm_anchor
from moska.server.admission import AdmissionController, Decision, Load, RequestCost, Verdict
from moska.server.storm_anchor import charged_s, step_delay_s, storm_end, storm_left_s

PLAIN, LIBRARY = RequestCost(64, 16), RequestCost(64, 16, 2048)
LOAD = Load((RequestCost(200, 16),) * 4, ((12, 0),) * 8, 0, 0.05)


def test_without_a_storm_the_delay_is_the_overrun_so_far():
    assert step_delay_s(0.02, 0.30, 0.0) == pytest.approx(0.28)
    assert step_delay_s(0.50, 0.10, 0.0) == 0.0  # not past its prediction: none


def test_during_a_storm_the_step_ends_with_it():
    first, busy, left = 0.05, 0.30, 0.40  # starved: it has overrun 6x
    # ends `left` from now plus its work not done (none: it has run past its prediction)
    assert step_delay_s(first, busy, left) + charged_s(first, busy) == pytest.approx(left)
    # a step not yet started (busy 0) also waits for the storm, then runs its work
    assert step_delay_s(first, 0.0, left) + charged_s(first, 0.0) == pytest.approx(left + first)


def test_a_later_429_in_the_storm_is_promised_less_by_its_place():
    """Two 429s of the same burst, 0.3 s apart in the storm: the same step end, so promises
    0.3 s apart. The old term grew with time instead (the overrun so far), and a promise
    that ignores the 429's place in the storm fails here."""
    first, start, storm_end = 0.05, 0.0, 1.1
    early = step_delay_s(first, 0.5 - start, storm_end - 0.5) + charged_s(first, 0.5)
    late = step_delay_s(first, 0.8 - start, storm_end - 0.8) + charged_s(first, 0.8)
    assert early - late == pytest.approx(0.3)
    assert step_delay_s(first, 0.8, 0.0) > step_delay_s(first, 0.5, 0.0)  # the old term


def test_a_storm_is_a_backlog_and_its_end_lapses_by_itself():
    assert storm_end(0.0, 300, 0.4, now=10.0, min_backlog=16) == pytest.approx(10.4)
    # a few connections waiting (a client's retries) are no storm: the end seen last stays
    assert storm_end(10.4, 3, 0.003, now=10.5, min_backlog=16) == 10.4
    assert storm_left_s(storm_end(10.4, 3, 0.003, now=10.5, min_backlog=16), now=10.5) == 0.0


def test_storm_left_and_modes():
    assert storm_left_s(10.0, now=9.5) == pytest.approx(0.5)
    assert storm_left_s(10.0, now=11.0) == 0.0
    assert storm_anchor.applies("all", 2048) and storm_anchor.applies("plain", 0)
    assert not storm_anchor.applies("plain", 2048) and not storm_anchor.applies("off", 0)
    # "door": plain drains everywhere, library drains only at the door (body unread)
    assert storm_anchor.applies("door", 0) and storm_anchor.applies("door", 2048, at_door=True)
    assert not storm_anchor.applies("door", 2048, at_door=False)
    assert AdmissionController(5.0, None).door_anchor == "door"  # the default (session 18)
    with pytest.raises(ValueError):
        storm_anchor.applies("sometimes", 0)


def drains(
    mode: str, cost: RequestCost, lefts: tuple[float, ...], at_door: bool = False
) -> list[float]:
    """The drain with the storm ending `left` from now, for each: on a frozen clock (the
    storm's time left read on a live one shrank by any stall between setting and reading)."""
    adm = AdmissionController(5.0, None)
    adm.door_anchor = mode
    out = []
    now = 1000.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(storm_anchor, "time", SimpleNamespace(monotonic=lambda: now))
        for left in lefts:
            adm.door.storm_until = now + left
            out.append(adm._drain(cost, LOAD, at_door=at_door)[1])
    return out


def test_the_controller_counts_down_to_the_storm_end_when_anchored():
    early, late = drains("plain", PLAIN, (0.9, 0.4))
    assert early - late == pytest.approx(0.5, abs=1e-9)  # the 0.5 s between their places
    off = drains("off", PLAIN, (0.9, 0.4))
    assert off[0] == pytest.approx(off[1], abs=1e-9)  # off: the storm is not seen
    assert late > off[1]  # the step cannot end before the storm does
    lib = drains("plain", LIBRARY, (0.9, 0.4))  # "plain" leaves library drains alone
    assert lib[0] == pytest.approx(lib[1], abs=1e-9)
    lib_all = drains("all", LIBRARY, (0.9, 0.4))
    assert lib_all[0] - lib_all[1] == pytest.approx(0.5, abs=1e-9)
    lib_door = drains("door", LIBRARY, (0.9, 0.4), at_door=True)
    assert lib_door[0] - lib_door[1] == pytest.approx(0.5, abs=1e-9)
    lib_read = drains("door", LIBRARY, (0.9, 0.4), at_door=False)  # decided after reading
    assert lib_read[0] == pytest.approx(lib_read[1], abs=1e-9)


def test_a_memoized_door_rejection_counts_down():
    d = Decision(Verdict.SLO, 6.0, 1, drain_s=0.5, made_at=100.0)
    assert d.aged(now=100.2).drain_s == pytest.approx(0.3)
    assert d.aged(now=100.2).retry_after_ms == 300
    assert d.aged(now=101.0).drain_s == pytest.approx(0.001)  # never 0: "no hint"
    plain = Decision(Verdict.SLO, 6.0, 1, drain_s=0.5)
    assert plain.aged(now=200.0) is plain  # not made to count down: as predicted
    endless = Decision(Verdict.SLO, 6.0, 3600, drain_s=math.inf, made_at=100.0)
    assert endless.aged(now=100.2) is endless


def test_the_door_stamps_its_rejection_only_when_anchored():
    for mode, stamped in (("off", False), ("plain", True)):
        adm = AdmissionController(5.0, None)
        adm.door_anchor = mode
        adm.door.inside = 400  # a burst inside: even one token misses the SLO
        d = adm.shed(Load((RequestCost(2000, 16),) * 40, ((12, 0),) * 8, 0, 0.05))
        assert d is not None and not d.accepted
        assert (d.made_at is not None) is stamped


def test_slo_off_still_never_rejects_with_the_anchor():
    adm = AdmissionController(0, None)  # `--ttft-slo 0`
    adm.door_anchor = "all"
    adm.door.inside, adm.door.storm_until = 400, time.monotonic() + 5.0
    heavy = Load((RequestCost(4000, 16),) * 40, ((12, 0),) * 8, 0, 3.0)
    assert adm.shed(heavy) is None
    assert adm.decide(LIBRARY, heavy).accepted


def test_storm_bounded_ttft():
    from moska.server.storm_anchor import storm_bounded_s

    # no storm, or a replay that ends within it: the scaled replay
    assert storm_bounded_s(0.3, 3.0, 0.0) == 3.0
    assert storm_bounded_s(0.3, 3.0, 5.0) == 3.0
    # a short storm: at the overrun's pace until it ends (0.1 s, 1/30 of the work), then the fit
    got = storm_bounded_s(0.3, 3.0, 0.1)
    assert abs(got - (0.1 + 0.3 * (1 - 0.1 / 3.0))) < 1e-12
    assert 0.3 < got < 0.45
    # between the unscaled and the scaled replay, growing with the storm
    prev = 0.0
    for left in (0.05, 0.5, 1.0, 2.0, 2.9):
        v = storm_bounded_s(0.3, 3.0, left)
        assert 0.3 <= v <= 3.0 and v >= prev
        prev = v
    assert storm_bounded_s(0.3, 0.3, 0.1) == 0.3  # the overrun did not lengthen it


def test_storm_bound_shortens_an_overrun_prediction_to_the_backlog():
    """`AdmissionController.storm_bound`: a step in progress 10x past its prediction scales
    the replay of a new request only for as long as the event loop's backlog lasts (the
    requests inside the door x its time per request); off, or with no backlog, as before."""
    adm = AdmissionController(5.0, None)
    overrun = Load((RequestCost(200, 16, 2048),) * 8, ((12, 2048),) * 8, 0, 0.0)
    first = adm.predict(LIBRARY, overrun).first_s
    overrun = Load(overrun.waiting, overrun.running, 0, 10 * first)
    scaled = adm.predict(LIBRARY, overrun).ttft_s
    unscaled = adm.predict(LIBRARY, overrun, overdue=False).ttft_s
    assert scaled > 3 * unscaled  # the overrun scale at work
    adm.storm_bound = True
    adm.door = SimpleNamespace(storm_until=0.0, wait_s=0.0)  # no backlog: as before
    assert adm.predict(LIBRARY, overrun).ttft_s == pytest.approx(scaled)
    adm.door = SimpleNamespace(storm_until=0.0, wait_s=0.05)  # a short backlog left
    bounded = adm.predict(LIBRARY, overrun).ttft_s
    assert unscaled < bounded < scaled
    assert bounded == pytest.approx(storm_anchor.storm_bounded_s(unscaled, scaled, 0.05))
    adm.storm_bound = False
    assert adm.predict(LIBRARY, overrun).ttft_s == pytest.approx(scaled)


def test_storm_bound_leaves_the_door_on_the_overrun_until_the_step_ends():
    """With `storm_bound`, a request decided after its body (`decide`) plans on the
    overrun's pace only for the loop's backlog, but the door's `shed` keeps it until the
    step in progress ends: its 429's drain counts down to that end (storm_anchor), and a
    door that reopened earlier made promises 2x too long (session 24, GPU 300 burst)."""
    from moska.server.front_door import FrontDoor

    adm = AdmissionController(5.0, None)
    adm.storm_bound = True
    adm.door = FrontDoor()
    tickets = [adm.door.enter() for _ in range(10)]  # a backlog: 10 x 5 ms
    base = Load((RequestCost(200, 16, 2048),) * 8, ((12, 2048),) * 8, 0, 0.0)
    first = adm.predict(RequestCost(1, 16), base).first_s
    overrun = Load(base.waiting, base.running, 0, 5 * first)  # the step 5x past it
    refused = adm.shed(overrun)
    assert refused is not None and refused.verdict is Verdict.SLO
    assert refused.drain_s > 0
    for t in tickets[1:]:
        adm.door.leave(t)
    # the same load, a plain request decided after reading: the bounded pace lets it in
    assert adm.decide(RequestCost(1, 16), overrun).accepted
    adm.storm_bound = False  # unbounded it is refused as at the door
    assert not adm.decide(RequestCost(1, 16), overrun).accepted


def test_storm_bound_is_on_for_a_gpu_engine_only():
    """The server's default (`storm_anchor.bound_by_default`, set by `create_app`): a GPU
    engine's overrun under a burst lasts the loop's backlog; a CPU engine's does not."""
    import torch
    from fake_engine import FakeEngine

    from moska.server.app import create_app
    from moska.server.storm_anchor import bound_by_default

    assert bound_by_default(SimpleNamespace(device=torch.device("cuda", 1)))
    assert bound_by_default(SimpleNamespace(device="cuda:0"))
    assert not bound_by_default(SimpleNamespace(device=torch.device("cpu")))
    assert not bound_by_default(SimpleNamespace())  # no device: as a CPU one
    engine = FakeEngine()
    assert not create_app(engine).state.moska.admission.storm_bound
    engine.device = torch.device("cuda", 0)  # the app touches no tensor of it
    assert create_app(engine).state.moska.admission.storm_bound
    given = AdmissionController(5.0, None)  # an admission handed in keeps its own setting
    assert not create_app(engine, admission=given).state.moska.admission.storm_bound
