"""Retry bookings (server/bookings.py): a 429 books its request for the moment it promises;
an early retry is told what is left, one at the moment is admitted behind only the
bookings before it, and clients that obey Retry-After get in on their first retry within
the SLO, on the real scheduler over a virtual clock."""

from __future__ import annotations

import asyncio
import heapq
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from test_admission import BUDGET, MAX_SEQS, VirtualServer, warm_up

from moska.server.admission import AdmissionController, Decision, EngineLimits, RequestCost, Verdict
from moska.server.bookings import BodyDigest, Bookings
from moska.server.load_shedding import LoadSheddingMiddleware, LoopLag
from moska.server.queue_replay import Load

C = RequestCost(64, 8)


def test_a_booking_is_found_until_it_lapses_and_claimed_once():
    b = Bookings(min_lapse_s=2.0, lapse_factor=1.0)  # (the default lapses at 3x the wait)
    assert b.book(b"k", 10.0, 3.0, C) == 3.0
    got = b.find(b"k", 11.0)
    assert got is not None and got.due == 13.0 and got.lapse == 16.0
    # 25 % of the wait early is on time (Retry-After's rounded seconds), half is not
    assert got.opens == pytest.approx(10.0 + 0.75 * 3.0)
    assert b.find(b"other", 11.0) is None and b.find(None, 11.0) is None
    b.claim(got)
    assert b.find(b"k", 12.0) is None and b.counts.claimed == 1 and b.show_rate == 1.0
    b.book(b"k", 20.0, 1.0, C)  # lapses at 20 + 1 + max(2, 1) = 23
    assert b.find(b"k", 22.9) is not None and b.find(b"k", 23.1) is None
    assert b.counts.lapsed == 1 and b.show_rate == pytest.approx(9 / 10)  # 1 of 1, prior 8


def test_bookings_of_one_door_drain_get_consecutive_moments():
    b = Bookings()
    moments = [b.book(bytes([i]), 0.0, 1.0, C, spacing_s=0.25) for i in range(4)]
    assert moments == pytest.approx([1.0, 1.25, 1.5, 1.75])
    assert b.book(b"late", 0.0, 5.0, C, spacing_s=0.25) == 5.0  # its drain is later still
    assert b.counts.made == 5 and len(b) == 5


def test_one_door_drain_is_spread_by_the_show_rate_and_the_front_end():
    """The door's memoized drain names one moment for a whole storm; the bookings behind it
    must still get consecutive moments when not every client comes back (session 19 scaled
    the whole queue by the show rate: at 0.97, 718 of 804 door 429s of a device burst got
    the same 0.1 s), and no closer than the event loop answers them."""
    b = Bookings()
    b._outcomes[1].extend([True] * 24 + [False] * 8)  # 3 in 4 come back: (24 + 8) / 40
    moments = [now + b.book(bytes([i]), now, 2.2 - now, C, spacing_s=0.01)
               for i, now in enumerate((0.0, 0.01, 0.02, 0.03))]  # fmt: skip
    steps = np.diff(moments)
    assert np.allclose(steps, 0.01 * b.show_rate) and b.show_rate == 0.8
    adm = AdmissionController(1.0, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    engine_gap = adm.pacing(RequestCost(33, 8))[0]
    adm.front_s = 0.05  # the loop's time per answer under a backlog
    gap = adm.pacing(RequestCost(34, 8))[0]
    assert gap == pytest.approx(0.05 * adm.front_answers) and gap > engine_gap


def test_what_bookings_count_ahead():
    b = Bookings(grace_s=0.25)
    b.book(b"a", 0.0, 1.0, RequestCost(1, 1))
    b.book(b"b", 0.5, 2.0, RequestCost(2, 1))
    b.book(b"c", 1.0, 9.0, RequestCost(3, 1))
    prompts = lambda xs: [x.prompt_tokens for x in xs]
    assert prompts(b.ahead(1.1)) == [1, 2, 3]  # a drain: every booking still to come
    assert prompts(b.ahead(1.3)) == [2, 3]  # a is more than grace_s past its moment
    assert prompts(b.ahead(1.1, due_by=5.0)) == [1, 2]  # a verdict: due within reach
    assert prompts(b.ahead(1.1, made_before=0.7)) == [1, 2]  # booked before it arrived
    own = b.find(b"b", 1.1)
    assert prompts(b.ahead(1.1, before=own)) == [1]  # a booked retry: those before it
    b._outcomes[1].extend([False] * 8)  # half of booked clients came back (8 seen, prior 8)
    assert b.show_rate == 0.5  # the earliest half counts
    assert prompts(b.ahead(1.1)) == [1, 2]


def test_a_client_refused_again_came_back_and_the_sdk_s_last_429_lapses_apart():
    """The OpenAI SDK retries twice: its third 429's booking always lapses. That is no
    sign that first bookings go unclaimed (on the device one show rate for all fell to
    0.03 and the booked queue was counted as empty), so show rates are kept by try."""
    b = Bookings(min_lapse_s=1.0, lapse_factor=0.0)
    for i in range(8):
        k = bytes([i])
        for t in (0.0, 1.0, 2.0):  # refused at each moment it came back to
            b.book(k, t, 1.0, C)
    b.find(b"x", 10.0)  # the third bookings lapse
    assert b.counts.lapsed == 8 and b.counts.rebooked == 16
    assert b.show_rate == 1.0 and b.show_rate_of(2) == 1.0
    assert b.show_rate_of(3) == pytest.approx(8 / 16)  # 0 of 8 came back, prior 8
    # what is counted ahead: each booking as likely as its try's clients came back
    b2 = Bookings(min_lapse_s=9.0)
    b2._outcomes[3].extend([False] * 24)  # tries 3: (0 + 8) / (24 + 8) = 0.25
    for i in range(4):
        for t in (0.0, 1.0, 2.0):
            b2.book(bytes([i]), t, 3.0 - t, C)  # due at 3.0 on its third try
    for i in range(4, 8):
        b2.book(bytes([i]), 2.0, 1.0, C)  # first tries, due at 3.0
    assert len(b2.ahead(2.9)) == round(4 * 0.25 + 4 * 1.0)


def test_a_probe_books_and_claims_nothing_and_off_means_off():
    b = Bookings(recording=lambda: False)
    b.book(b"k", 0.0, 1.0, C)
    assert b.find(b"k", 0.5) is None and b.counts.made == 0
    off = Bookings(enabled=False)
    off.book(b"k", 0.0, 1.0, C)
    assert off.find(b"k", 0.5) is None and off.ahead(0.5) == []


def _burst(bookings: bool, n: int = 160, slo: float = 1.0) -> dict:
    """`n` requests at once on the real scheduler (virtual clock), each with its own key;
    every client refused retries for real at its promise (the OpenAI SDK's way), up to 3
    times, and a dry retry at half its promise is asked first (it must be refused)."""
    adm = AdmissionController(slo, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    adm.bookings.enabled = bookings
    server = VirtualServer(adm)
    warm_up(server)
    server.run_until_idle()
    t0 = server.t
    due: list[tuple[float, int, int]] = []  # (retry time, client, attempt)
    first: dict[int, float] = {}  # client -> its first promise
    out = {"refused": 0, "first_retry_ok": 0, "half_refused": 0, "admitted": {}}

    def send(client: int, attempt: int) -> None:
        key = client.to_bytes(4, "big")
        cost = RequestCost(32 + client % 64, 8)
        rid = f"r{server.n}"
        server.n += 1
        d = adm.decide(cost, server.load(), key=key)
        if d.accepted:
            server.costs[rid], server.generated[rid], server.arrival[rid] = cost, 0, server.t
            server.predicted[rid] = d.predicted_ttft_s
            from moska.engine.request import Request
            from moska.engine.sampling_params import SamplingParams

            params = SamplingParams(max_tokens=cost.max_tokens, ignore_eos=True)
            server.sched.add_request(Request(rid, [7] * cost.prompt_tokens, params))
            server.added += 1
            out["admitted"][rid] = attempt
            if attempt == 1:
                out["first_retry_ok"] += 1
            return
        assert d.verdict is Verdict.SLO and math.isfinite(d.drain_s)
        if attempt == 0:
            out["refused"] += 1
            first[client] = d.drain_s
            heapq.heappush(due, (server.t + d.drain_s / 2, client, -1))  # dry, at half
        if attempt < 3:
            heapq.heappush(due, (server.t + d.drain_s, client, attempt + 1))

    for client in range(n):
        send(client, 0)
    while due or server.sched.has_unfinished:
        while due and due[0][0] <= server.t:
            at, client, attempt = heapq.heappop(due)
            if attempt < 0:  # a dry retry: decided, never run, books and claims nothing,
                adm.bookings.recording = lambda: False  # at exactly half (steps are coarse)
                adm.clock = lambda: at  # noqa: B023
                dry = adm.decide(RequestCost(32 + client % 64, 8), server.load(),
                                 key=client.to_bytes(4, "big"))  # fmt: skip
                adm.bookings.recording = lambda: True
                adm.clock = lambda: server.t
                out["half_refused"] += not dry.accepted
            else:
                send(client, attempt)
        if server.sched.has_unfinished:
            server.step()
        elif due:
            server.t = max(server.t, due[0][0])  # idle until the next retry
    ttfts = [server.ttft(r) for r in out["admitted"]]
    out["slo_met"] = sum(t <= slo for t in ttfts) / len(ttfts)
    out["wall"] = server.t - t0
    out["counts"] = vars(adm.bookings.counts)
    return out


def test_clients_that_obey_retry_after_get_in_on_their_first_retry_within_the_slo():
    on, off = _burst(True), _burst(False)
    assert on["refused"] > 100 and off["refused"] > 100  # most of the burst waits
    share_on = on["first_retry_ok"] / on["refused"]
    share_off = off["first_retry_ok"] / off["refused"]
    # booked: a retry at its promise gets in, one at half is told to wait: within 2x
    assert share_on >= 0.95, on
    assert on["half_refused"] / on["refused"] >= 0.95, on
    assert on["slo_met"] >= 0.95, on  # and the retries meet the SLO too
    assert share_on > share_off, (on, off)  # without bookings they race each other back
    assert on["counts"]["claimed"] == on["first_retry_ok"] + sum(
        1 for a in on["admitted"].values() if a > 1
    )


def _door(adm: AdmissionController, shed: Decision | None):
    """The load-shedding middleware over an app that answers 200, `shed` its door."""
    reached: list[bytes] = []

    async def inner(scope, receive, send):
        message = await receive()
        reached.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    mw = LoadSheddingMiddleware(inner, shed=lambda: shed)
    app = SimpleNamespace(state=SimpleNamespace(moska=SimpleNamespace(
        loop_lag=LoopLag(), admission=adm)))  # fmt: skip
    return mw, app, reached


def _post(mw, app, body: bytes) -> tuple[int, dict[str, str], bytes]:
    sent: list = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [],
             "app": app}  # fmt: skip
    asyncio.run(mw(scope, receive, send))
    headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], headers, sent[-1]["body"]


def test_the_door_books_a_429_tells_an_early_retry_the_time_left_and_lets_it_in_on_time():
    adm = AdmissionController(5.0, None)
    now = [100.0]
    adm.clock = lambda: now[0]
    shed = Decision(Verdict.SLO, 9.0, 1, 0.8)  # the door sheds everyone for now
    mw, app, reached = _door(adm, shed)
    body = b'{"prompt": "the same request"}'
    status, headers, _ = _post(mw, app, body)
    assert status == 429 and headers["retry-after-ms"] == "800"
    now[0] += 0.3  # early: the same appointment, 0.5 s left
    status, headers, text = _post(mw, app, body)
    assert status == 429 and headers["retry-after-ms"] == "500"
    assert "retry booked" in json.loads(text)["error"]["message"]
    status, headers, _ = _post(mw, app, b'{"prompt": "another request"}')
    assert status == 429 and int(headers["retry-after-ms"]) >= 800  # booked behind it
    now[0] += 0.35  # 0.81 of its wait (Retry-After's whole second would say 1 s, not 0.8):
    # on time; in it goes, the body the door read given to the app
    status, _, _ = _post(mw, app, body)
    assert status == 200 and reached == [body]
    assert adm.bookings.counts.made == 2 and adm.bookings.counts.early == 1


def test_a_retry_refused_at_its_moment_goes_behind_the_queue_and_slows_the_pace():
    """Session 21: a refused retry booked again at its own drain (0.3 s here) came back
    into the moments of the bookings after it; in a virtual 64-client library burst that
    cost a quarter of the first retries."""
    b = Bookings()
    b.book(b"a", 0.0, 1.0, C, spacing_s=0.5)
    assert b.book(b"b", 0.0, 0.2, C, spacing_s=0.5) == pytest.approx(1.5)  # behind a
    # a comes back at 1.0 and is refused: behind b (at 1.5), not its own drain (0.3 s)
    assert b.book(b"a", 1.0, 0.3, C, spacing_s=0.5) == pytest.approx(1.0)
    assert b.counts.rebooked == 1 and b.pace == pytest.approx(1.1)
    assert b.book(b"c", 1.0, 0.1, C, spacing_s=0.5) == pytest.approx(1.0 + 0.55)  # a, paced
    b.claim(b.find(b"a", 1.9))
    assert b.pace == pytest.approx(1.1 * (1 - 0.1 / 19))


def test_library_retries_refused_at_their_moment_slow_the_library_pace_only():
    """On the device's CPU cores library retries refused at their moment took the one pace
    to 7.8 in a 64-client burst, and the plain retries of the next burst were spaced 8x."""
    b = Bookings()
    lib = RequestCost(64, 8, 4096)
    for i in range(5):
        b.book(bytes([i]), 0.0, 1.0, lib)
        b.book(bytes([i]), 1.0, 1.0, lib)  # refused at its moment
    assert b.paces[True] == pytest.approx(1.1**5) and b.paces[False] == 1.0
    assert b.pace == b.paces[True]  # the metric: the slower kind
    tail = max(x.due for x in b._by_key.values())
    assert b.book(b"plain", 1.0, 0.0, C, spacing_s=0.5) == pytest.approx(tail - 1.0 + 0.5)


def test_the_door_refuses_a_booked_retry_admission_would_refuse_without_the_route():
    """At its moment a booked retry is decided at the door on its booking's cost: refused,
    it is booked again there (on the device the refused ones took the route's whole path
    and the loop answered ~120 a second); taken, it goes in."""
    adm = AdmissionController(1.0, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    now = [0.0]
    adm.clock = lambda: now[0]
    shed = Decision(Verdict.SLO, 9.0, 1, 0.8)
    mw, app, reached = _door(adm, shed)
    busy = Load(tuple(RequestCost(400, 8) for _ in range(40)), ())
    engine = SimpleNamespace(load=lambda: busy)
    app.state.moska.async_engine = engine
    body = b'{"prompt": "once more"}'
    status, headers, _ = _post(mw, app, body)  # booked at the door
    assert status == 429 and adm.front_s == mw.backlog.answer_s > 0
    now[0] += int(headers["retry-after-ms"]) / 1e3  # at its moment, the engine still busy
    status, headers, text = _post(mw, app, body)
    assert status == 429 and reached == [] and adm.bookings.counts.rebooked == 1
    assert "retry booked" in json.loads(text)["error"]["message"]
    engine.load = lambda: Load()  # idle by its next moment: in it goes
    now[0] += int(headers["retry-after-ms"]) / 1e3
    status, _, _ = _post(mw, app, body)
    assert status == 200 and reached == [body]
    # a booking the route made (its real cost) is decided at the door the same way
    other = b'{"prompt": "booked in the route"}'
    digest = BodyDigest("/v1/completions")
    digest.feed(other, False)
    first = adm.decide(RequestCost(64, 8), busy, key=digest.key())
    assert not first.accepted
    engine.load = lambda: busy
    now[0] += first.drain_s
    assert _post(mw, app, other)[0] == 429 and adm.bookings.counts.rebooked == 2
