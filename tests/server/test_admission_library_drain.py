"""A library request's Retry-After is the predicted time until it would be admitted: until
the queue ahead is short enough for it to fit with its error, or, when its prefill alone
is longer than the SLO, until the engine is idle (an idle engine admits anything). The
real scheduler on a virtual clock (test_admission.VirtualServer): milliseconds."""

from __future__ import annotations

from test_admission import BUDGET, MAX_SEQS, VirtualServer, warm_up

from moska.server.admission import AdmissionController, EngineLimits, RequestCost, Verdict


def _burst(slo: float) -> tuple[AdmissionController, VirtualServer, float]:
    """A learned controller under SLO `slo` and 60 plain requests submitted at once."""
    adm = AdmissionController(None, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    server = VirtualServer(adm)
    warm_up(server)
    adm.ttft_slo = slo
    t0 = server.t
    assert sum(server.submit(RequestCost(150, 12))[1].accepted for _ in range(60)) > 3
    return adm, server, t0


def _reopens(server: VirtualServer, probe: RequestCost, t0: float) -> tuple[float, float]:
    """Step until `probe` is admitted: (seconds before the last step, after it) from t0."""
    while True:
        before = server.t - t0
        server.step()
        if server.submit(probe)[1].accepted:
            return before, server.t - t0


def test_a_library_request_longer_than_the_slo_waits_until_the_engine_is_idle():
    """Its prefill alone (2.7 s) misses an SLO of 1 s, so it is admitted only when the
    engine is idle: the drain is the time until the burst ahead has finished decoding,
    within 2x of when it is really admitted, and not the overshoot of its TTFT."""
    adm, server, t0 = _burst(1.0)
    lib = RequestCost(400, 8, library_attend=8192)
    d = server.submit(lib)[1]
    assert d.verdict is Verdict.SLO
    pred = adm.predict(lib, server.load())
    assert pred.alone_s > adm.headroom * adm.ttft_slo
    assert d.drain_s == pred.idle_s
    before, after = _reopens(server, lib, t0)
    assert server.load().waiting == (lib,) and not server.load().running  # admitted idle
    assert 0.5 * before <= d.drain_s <= 2 * after, (d.drain_s, before, after)
    overshoot = d.predicted_ttft_s * adm.library_risk - adm.headroom * adm.ttft_slo
    assert not 0.5 * before <= overshoot <= 2 * after, (overshoot, before, after)
    assert d.retry_after_ms == round(d.drain_s * 1000)


def test_a_library_request_is_back_when_the_queue_ahead_is_short_enough():
    """Its prefill fits the SLO, but with 1.5x its error only once the queue ahead is
    short: the drain is when risk x the remaining TTFT fits, within 2x of when it is
    admitted again."""
    adm, server, t0 = _burst(1.0)
    lib = RequestCost(100, 8, library_attend=2048)
    d = server.submit(lib)[1]
    assert d.verdict is Verdict.SLO
    pred = adm.predict(lib, server.load())
    fits = adm.headroom * adm.ttft_slo
    assert pred.alone_s < fits < pred.ttft_s
    assert d.drain_s < pred.idle_s
    before, after = _reopens(server, lib, t0)
    assert 0.5 * before <= d.drain_s <= 2 * after, (d.drain_s, before, after)
