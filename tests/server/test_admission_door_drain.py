"""A 429's drain counts the requests past the front door that admission will still admit:
a retry waits for them too. The real scheduler on a virtual clock
(test_admission.VirtualServer), and one fake-engine server for the door's library drain."""

from __future__ import annotations

import httpx
from fake_engine import FakeEngine
from test_admission import BUDGET, MAX_SEQS, VirtualServer, warm_up
from test_load_shedding import _Shedding

from moska.server.admission import AdmissionController, Decision, EngineLimits, Load, Verdict
from moska.server.app import create_app
from moska.server.background import background_server
from moska.server.front_door import BODY_BYTES
from moska.server.queue_replay import RequestCost
from moska.server.retry_drain import door_admits
from moska.server.settings import ServerSettings

INSIDE = 60  # a burst past the door, not yet decided
PLAIN = RequestCost(100, 12)  # each like the warm-up's typical admitted request
LIBRARY = RequestCost(400, 8, library_attend=8192)  # its prefill alone misses the SLO


def _burst_at_the_door() -> tuple[AdmissionController, VirtualServer, list]:
    adm = AdmissionController(None, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    server = VirtualServer(adm)
    warm_up(server)
    adm.ttft_slo = 1.0
    return adm, server, [adm.door.enter() for _ in range(INSIDE)]


def test_a_library_retry_waits_for_what_the_door_still_admits():
    """An idle engine, 60 plain requests inside the door, and a library request decided
    first: its prefill alone misses the SLO, so it is admitted only once the engine is
    idle, after the door's requests that were admitted are served. The drain counts them
    and is within 2x of when the retry is really admitted; the drain of the engine's load
    alone (the door's wait at most: what it said before) is not."""
    adm, server, tickets = _burst_at_the_door()
    d = server.submit(LIBRARY)[1]
    assert d.verdict is Verdict.SLO
    fits = adm.headroom * adm.ttft_slo
    alone = adm.predict(LIBRARY, server.load())
    assert alone.alone_s > fits
    old = max(alone.idle_s, adm.door.wait_s)  # without the door's admitted requests
    t0 = server.t
    admitted = 0
    for ticket in tickets:  # the door's requests are decided, at once
        adm.door.leave(ticket)
        admitted += server.submit(PLAIN)[1].accepted
    assert 5 < admitted < INSIDE
    before, after = server.retry_until_admitted(LIBRARY, t0)  # a retry after each step
    assert not server.load().running  # admitted on the idle engine
    assert 0.5 * before <= d.drain_s <= 2 * after, (d.drain_s, before, after)
    assert not 0.5 * before <= old <= 2 * after, (old, before, after)
    server.run_until_idle()


def test_more_requests_inside_do_not_hide_the_ones_admitted():
    """A costly hand-over (0.8 s per 100 requests, as fitted on CPU): of 120 or 300 inside,
    as many are admitted, the most whose first token still fits (a scan agrees), each
    handed over as it is decided (one replay of all 300 charged their hand-over first
    and found none)."""
    adm = AdmissionController(5.0, None, prior=(0.01, 0.43, 15.0, 0.22, 0.84))
    typical, fits = RequestCost(128, 16), adm.headroom * 5.0
    n = door_admits(adm.predict, typical, Load(), 300, fits)
    assert 0 < n == door_admits(adm.predict, typical, Load(), 120, fits) < 120
    scan = max(k for k in range(121) if k == 0 or adm.predict(typical, Load(), k).ttft_s <= fits)
    assert n == scan
    assert adm.predict(typical, Load(), 300).ttft_s > fits  # all of them would not fit


def test_the_door_says_a_library_drain_apart():
    """At the door (body unread) the 429 carries a typical admitted request's drain and a
    typical decided library request's, which grows as costlier library requests are
    decided (each rejected here: the engine is busy). The mix inside stays the warm-up's
    (`LibraryRequests.share`: more library requests inside would count fewer admitted)."""
    adm, _, tickets = _burst_at_the_door()
    adm.shed_ttl_s = 0.0
    busy = Load(running=((8, 0),) * 8)
    first = adm.shed(busy)
    assert first is not None and first.library_drain_s is not None  # the warm-up's
    share = adm.library_requests.share
    for _ in range(20):
        assert not adm.decide(LIBRARY, busy).accepted
    adm.library_requests.share = share
    shed = adm.shed(busy)
    assert shed is not None and shed.library_drain_s is not None
    assert shed.library_drain_s > max(2 * shed.drain_s, first.library_drain_s)
    lib = shed.for_library()
    assert lib.drain_s == shed.library_drain_s and lib.verdict is Verdict.SLO
    assert lib.retry_headers()["retry-after-ms"] == str(round(1000 * shed.library_drain_s))
    for t in tickets:
        adm.door.leave(t)


def test_a_library_request_at_the_door_gets_the_drain_of_its_size():
    """Library requests decided with their body sizes (prompt + 200 bytes) teach the door
    the prompt of a body: a short library request rejected unread is promised the drain
    of a short one, shorter than a long one's (its prefill alone misses the SLO: it waits
    for the idle engine)."""
    adm, server, tickets = _burst_at_the_door()
    adm.shed_ttl_s = 0.0
    share = adm.library_requests.share  # the mix inside stays the warm-up's
    for prompt in range(20, 420, 20):
        token = BODY_BYTES.set(prompt + 200)
        server.submit(RequestCost(prompt, 8, library_attend=8192))
        BODY_BYTES.reset(token)
    adm.library_requests.share = share
    assert abs(adm.library_requests.prompt_tokens(248) - 48) <= 1
    busy = Load(running=((8, 0),) * 8)
    shed = adm.shed(busy)
    assert shed is not None
    short, long = shed.for_library(248), shed.for_library(600)
    assert short.drain_s < long.drain_s / 2 and short.retry_after_s <= long.retry_after_s
    told = adm.library_requests.cost(248)  # the typical library request, of 48 tokens
    assert told is not None and told.prompt_tokens == 48
    assert short.drain_s == adm._drain(told, busy)[1]
    assert shed.for_library(None).drain_s == shed.library_drain_s  # no Content-Length
    for t in tickets:
        adm.door.leave(t)


class _LibraryShedding(_Shedding):
    def shed(self, load: Load, elapsed_s: float = 0.0) -> Decision | None:
        decision = super().shed(load, elapsed_s)
        if decision is None:
            return None
        return Decision(Verdict.SLO, 9.0, 3, 3.2, 7.5, lambda n: 6.0 if n < 50 else 7.5)


def test_a_429_at_the_door_names_the_library_drain_for_a_library_body():
    """The door glances at the 429's body: a library request gets the library drain of
    its size (Content-Length), a plain one (a prompt that says "library" too) the plain
    drain."""
    admission = _LibraryShedding()  # (no bookings: the third 429 would queue behind two)
    app = create_app(FakeEngine(), ServerSettings(retry_bookings=False), admission=admission)
    admission.overloaded.set()
    with background_server(app) as url:
        body = {"model": "fake-model", "prompt": 'say "library": "x"', "max_tokens": 2}
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after-ms"] == "3200"
        r = httpx.post(f"{url}/v1/completions", json=body | {"library": "demo"})
        assert r.status_code == 429 and r.headers["retry-after-ms"] == "7500"
        assert r.headers["retry-after"] == "8" and "predicted drain 7.50s" in r.text
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "library": "demo"})
        assert r.status_code == 429 and r.headers["retry-after-ms"] == "6000"


def test_a_shed_promises_at_least_the_wait_before_the_door():
    """A request shed after the event loop kept it 0.7 s before the door is not promised
    less than that: its retry waits there too (at 1,000 clients on CPU plain at-door
    promises of ~0 s met 0.4 s reopenings)."""
    adm, _, tickets = _burst_at_the_door()
    adm.shed_ttl_s, adm.door_open = 0.0, True  # session 17's door wait (an A/B, off)
    busy = Load(running=((8, 0),) * 8)
    quick, lagged = adm.shed(busy), adm.shed(busy, elapsed_s=0.7)
    assert quick is not None and lagged is not None and lagged.verdict is Verdict.SLO
    # the door's part: until it lets a retry in (session 17; before, until it was empty)
    typical, fits = adm._typical_cost(), adm.fits_s()
    wait = adm._door_wait(busy, fits, typical)
    assert 0.0 < wait < adm.door.wait_s  # some of those inside still fit ahead of it
    assert lagged.drain_s >= 0.7 + wait - 1e-9
    adm.door_open, adm._open_memo = False, None  # the default: until the door is empty
    assert adm.shed(busy, elapsed_s=0.7).drain_s >= 0.7 + adm.door.wait_s - 1e-9
    assert lagged.drain_s >= quick.drain_s
    assert int(lagged.retry_headers()["retry-after-ms"]) >= 700
    for t in tickets:
        adm.door.leave(t)
