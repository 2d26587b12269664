"""`moska bench load --trace` (bench/load_trace.py): an admitted request's client TTFT is
split into its parts from the server's records, joined by client port and prediction."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moska.bench import load_trace
from moska.bench.load_trace import PORT, PortTag, TracingAdmission, breakdown
from moska.server.admission import Load, RequestCost
from moska.server.load_shedding import ARRIVAL


def test_the_parts_of_an_admitted_requests_ttft_add_up(monkeypatch):
    now = 1000.0  # the tracer's clock, frozen: its decision is stamped at `now`
    monkeypatch.setattr(load_trace, "time", SimpleNamespace(monotonic=lambda: now))
    adm = TracingAdmission(5.0, None)
    tag = PortTag(app=None)
    mark = adm.mark()
    t0 = now - 0.5  # the burst began half a second ago: deciding now
    written, called, arrival = t0 + 0.1, t0 + 0.4, t0 + 0.45
    tag.called[5001] = called
    a, p = ARRIVAL.set(arrival), PORT.set(5001)
    try:
        d = adm.decide(RequestCost(32, 4), Load(), elapsed_s=0.2)
    finally:
        ARRIVAL.reset(a)
        PORT.reset(p)
    assert d.accepted
    decided = adm.decisions[-1]["t"]
    assert decided == now
    first = decided + 1.5
    adm.firsts.append((first, d.predicted_ttft_s, first - arrival))
    tag.first_body[5001] = first + 0.25
    ttft = first + 0.25 + 0.05 - written  # the client read it 50 ms after it was sent
    client = {"status": 200, "ttft": ttft, "t_start": 0.09, "connect_s": 0.01, "port": 5001}
    rejected = {"status": 429, "ttft": None, "t_start": 0.0, "connect_s": 0.01, "port": 5002}
    out = {"t0": t0, "requests": [client, rejected]}
    got = breakdown(adm, tag, mark, out, slo=5.0)
    assert got["joined"] == 1
    (row,) = got["admitted"]
    parts = ("accept_s", "to_arrival_s", "to_decision_s", "engine_observed_s", "to_send_s")
    assert sum(row[k] for k in parts) + row["to_client_s"] == pytest.approx(ttft, abs=2e-3)
    assert row["accept_s"] == pytest.approx(0.3) and row["to_send_s"] == pytest.approx(0.25)
    assert row["engine_observed_s"] == pytest.approx(1.5, abs=1e-3)
    assert row["charged_before_s"] == 0.2
    assert row["to_decision_s"] == pytest.approx(0.05) and ttft < 5.0
    assert got["client_ttft_within_slo_share"] == 1.0 == got["server_ttft_within_slo_share"]


def test_a_429s_delivery_is_timed_from_its_status_sent_to_its_client_reading_it():
    """`rejected_to_client`: the server's send of a 429's status (recorded by `PortTag` on
    the ASGI `http.response.start`) joined by port with the client's `t_status`; a port
    whose last answer was not a 429, or one sent after the client read it, is left out."""
    import asyncio

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": scope["path_status"]})
        await send({"type": "http.response.body", "body": b"{}"})

    async def drop(message):
        return None

    tag = PortTag(app)
    for port, status in ((6001, 429), (6002, 200), (6003, 429)):
        scope = {"type": "http", "client": ("127.0.0.1", port), "path_status": status}
        asyncio.run(tag(scope, None, drop))
    assert tag.status_sent[6001][0] == 429 and tag.status_sent[6002][0] == 200
    sent = tag.status_sent[6001][1]
    t0 = sent - 1.0
    requests = [
        {"status": 429, "t_status": 1.3, "port": 6001},  # read 0.3 s after it went out
        {"status": 429, "t_status": 1.3, "port": 6002},  # the port's last answer: a 200
        {"status": 429, "t_status": -5.0, "port": 6003},  # read before it was sent: reused
        {"status": 200, "t_status": 1.0, "port": 6001},
    ]
    lags = load_trace.rejected_to_client(tag, {"t0": t0, "requests": requests})
    assert lags == [pytest.approx(0.3)]


def test_the_trace_records_collections_from_the_bursts_start_and_close_stops_it():
    """`TracingAdmission.gc_pauses` (a `gc.callbacks` hook): a collection of 2 ms or more is
    kept with its generation, and `breakdown` lists those from the burst's start on."""
    import gc
    import time

    adm = TracingAdmission(5.0, None)
    try:
        mark = adm.mark()
        t0 = time.monotonic()
        junk = [[i] for i in range(300_000)]  # enough live objects for a full pass to take ms
        gc.collect()
        assert junk  # alive through the collection
        got = breakdown(adm, PortTag(app=None), mark, {"t0": t0, "requests": []}, slo=5.0)
        pauses = got["gc_pauses"]
        assert pauses and pauses[-1]["gen"] == 2 and pauses[-1]["s"] >= 0.002
        assert all(p["t"] >= 0 for p in pauses)
    finally:
        adm.close()
    assert adm._gc_event not in gc.callbacks
    n = len(adm.gc_pauses)
    gc.collect()
    assert len(adm.gc_pauses) == n  # no longer recording
