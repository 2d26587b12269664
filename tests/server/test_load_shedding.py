"""Admission at the door: under overload a generation request gets its 429 before its body
is read, and the time a request spent in the server counts against the SLO."""

from __future__ import annotations

import threading

import httpx
import pytest
from fake_engine import FakeEngine

from moska.server.admission import AdmissionController, Decision, Load, RequestCost, Verdict
from moska.server.app import create_app
from moska.server.background import background_server
from moska.server.retry_drain import door_admits
from moska.server.settings import ServerSettings


class _Shedding(AdmissionController):
    """Admission that sheds at the door while `overloaded` is set."""

    def __init__(self) -> None:
        super().__init__(5.0, 256)
        self.overloaded = threading.Event()

    def shed(self, load: Load, elapsed_s: float = 0.0) -> Decision | None:
        if self.overloaded.is_set():
            return Decision(Verdict.SLO, 9.0, 3, 3.2)
        return None


def test_overload_is_a_429_at_the_door_without_reading_the_body():
    admission = _Shedding()
    app = create_app(FakeEngine(), ServerSettings(), admission=admission)
    with background_server(app) as url:
        body = {"model": "fake-model", "prompt": "x", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        admission.overloaded.set()
        read = threading.Event()

        def chunks():  # a body the server would have to read; it must not
            read.set()
            yield b'{"model": "fake-model", "prompt": "x"}'

        r = httpx.post(
            f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert r.headers["retry-after-ms"] == "3200"  # OpenAI's header: the exact drain
        assert r.json()["error"]["code"] == "ttft_slo"
        # other routes are not shed
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'moska_rejections_total{reason="ttft_slo"} 1.0' in metrics
        admission.overloaded.clear()
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200


def test_time_spent_in_the_server_counts_against_the_slo():
    adm = AdmissionController(1.0, None)
    load = Load(waiting=(RequestCost(8),), running=((4, 0),))
    fresh = adm.decide(RequestCost(8), load)
    assert fresh.accepted  # the prior's prediction fits 0.85 s
    late = adm.decide(RequestCost(8), load, elapsed_s=2.0)
    assert not late.accepted and late.verdict is Verdict.SLO
    assert late.predicted_ttft_s == fresh.predicted_ttft_s + 2.0
    # the engine part fits: a retry is admitted as soon as nobody queues at the door
    assert late.drain_s == 0.0 and late.retry_after_s == 1
    # with 300 requests inside the front door, a retry waits until the door lets it in:
    # those inside are decided down to the count that still fits ahead of it (session 17;
    # it queued behind all 300 before, `door_open` False)
    tickets = [adm.door.enter() for _ in range(300)]
    adm.door_open = True
    behind = adm.decide(RequestCost(8), load, elapsed_s=2.0)
    fit = door_admits(adm.predict, adm._typical_cost(), load, 300, adm.fits_s())
    assert 0 < fit < 300
    assert behind.drain_s == pytest.approx((300 - fit) * adm.door.gap_s)
    adm.door_open, adm._open_memo = False, None
    behind = adm.decide(RequestCost(8), load, elapsed_s=2.0)
    assert behind.drain_s == pytest.approx(300 * adm.door.gap_s)
    for t in tickets:
        adm.door.leave(t)
    assert adm.door.inside == 0
    # the smallest request is what the door checks
    assert adm.shed(load) is None
    heavy = Load(waiting=tuple(RequestCost(4096) for _ in range(200)))
    shed = AdmissionController(1.0, None).shed(heavy)
    assert shed is not None and shed.retry_after_s >= 1
