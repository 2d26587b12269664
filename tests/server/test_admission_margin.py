"""Admission's margin (server/ttft_margin.py): how long first tokens waited between the
engine and their HTTP handler is learned and taken off what fits the SLO, a recent window
of it (a shut door is unlearned by later samples), and the server reports each wait."""

from __future__ import annotations

import random

import pytest

from moska.server.admission import AdmissionController, EngineLimits, Load, RequestCost, Verdict
from moska.server.ttft_margin import TtftMargin


def test_the_margin_is_a_high_quantile_of_recent_waits():
    rng = random.Random(3)
    waits = [rng.uniform(0.0, 0.5) for _ in range(50)]
    m = TtftMargin(window=64, quantile=0.9)
    assert m.seconds == 0.0  # nothing seen: no margin
    for w in waits:
        m.delivered(w)
    ranked = sorted(waits)
    assert ranked[int(0.9 * len(ranked)) - 1] <= m.seconds <= ranked[int(0.9 * len(ranked)) + 1]
    m.delivered(-1.0)  # a clock step backwards is not a wait
    assert len(m._delivery) == 50


def test_old_waits_leave_the_window():
    m = TtftMargin(window=8, quantile=0.9)
    for _ in range(8):
        m.delivered(3.0)  # a burst whose loop fell behind
    assert m.seconds == 3.0
    for _ in range(8):
        m.delivered(0.01)  # the requests admitted after it (an idle server admits)
    assert m.seconds == pytest.approx(0.01)


@pytest.mark.parametrize("bad", [{"quantile": 0.0}, {"quantile": 1.5}, {"window": 0}])
def test_bad_margin_settings_say_which(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TtftMargin(**bad)


def test_admission_takes_the_margin_off_what_fits():
    """A request predicted just under headroom x SLO is admitted without a margin and
    rejected once first tokens have been seen to wait longer than what is left; its
    429's drain grows by that margin too (the drain is until it fits with it)."""
    adm = AdmissionController(5.0, None, limits=EngineLimits(256, 8))
    load = Load(tuple(RequestCost(200, 8) for _ in range(20)))
    new = RequestCost(100, 8)
    ttft = adm.predict_ttft(new, load)
    adm.ttft_slo = ttft / adm.headroom / 0.98  # the prediction is 98% of what fits
    assert adm.fits_s() == pytest.approx(adm.headroom * adm.ttft_slo)
    assert adm.decide(new, load).accepted
    for _ in range(10):
        adm.observe_delivery(0.05 * ttft)  # more than the 2% left
    assert adm.fits_s() == pytest.approx(adm.headroom * adm.ttft_slo - 0.05 * ttft)
    d = adm.decide(new, load)
    assert d.verdict is Verdict.SLO and d.predicted_ttft_s == pytest.approx(ttft)
    adm.margin = TtftMargin()
    adm.ttft_slo = 0.5 * ttft / adm.headroom  # rejected either way: compare the drains
    plain = adm.decide(new, load).drain_s
    for _ in range(10):
        adm.observe_delivery(0.1 * ttft)
    assert adm.decide(new, load).drain_s == pytest.approx(plain + 0.1 * ttft, rel=0.05)


def test_no_slo_fits_everything():
    adm = AdmissionController(None, None)
    adm.observe_delivery(10.0)
    assert adm.fits_s() == float("inf")


def test_the_server_reports_each_first_tokens_wait(fake_server):
    """Each choice's first token, once its handler has it, is one sample of the margin:
    a stream with n=2 adds two, between 0 and the request's own time."""
    import time

    import httpx

    url, app, _ = fake_server
    adm = app.state.moska.admission
    kept, adm.margin = adm.margin, TtftMargin()  # the session's server: a fresh window
    body = {"model": app.state.moska.model_name, "prompt": "hello", "max_tokens": 3}
    t0 = time.monotonic()
    try:
        r = httpx.post(
            f"{url}/v1/completions",
            json=body | {"stream": True, "n": 2},
            headers={"Authorization": "Bearer sekret"},
            timeout=30,
        )
        took = time.monotonic() - t0
    finally:
        new, adm.margin = list(adm.margin._delivery), kept
    assert r.status_code == 200 and "[DONE]" in r.text
    assert len(new) == 2 and all(0.0 <= w <= took for w in new), (new, took)


def test_a_step_running_past_its_prediction_scales_the_replay():
    """The step in progress has already run twice its predicted time: every step of the
    replay is taken as twice as long (the factor learns only from steps that ended, after
    a burst's admissions); a step still within its prediction changes nothing."""
    from dataclasses import replace

    adm = AdmissionController(5.0, None, limits=EngineLimits(256, 8))
    load = Load(tuple(RequestCost(200, 8) for _ in range(6)))
    new = RequestCost(100, 8)
    fresh = adm.predict(new, load)  # not busy: the replay as it was
    assert fresh.first_s > 0
    within = adm.predict(new, replace(load, busy_s=0.5 * fresh.first_s))
    assert within.ttft_s == pytest.approx(fresh.ttft_s - 0.5 * fresh.first_s)
    late = adm.predict(new, replace(load, busy_s=2.0 * fresh.first_s))
    # the rest of the first step (a quarter of it, at least) and every later step, doubled
    rest = 0.25 * 2.0 * fresh.first_s
    assert late.ttft_s == pytest.approx(rest + 2.0 * (fresh.ttft_s - fresh.first_s))
    assert late.first_s == pytest.approx(2.0 * fresh.first_s)
