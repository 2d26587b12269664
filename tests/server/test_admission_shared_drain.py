"""Requests near the idle-only line. One whose prefill alone misses the SLO is admitted
only on an idle engine: the predicted time until then counts all the work ahead of it
(the prefill of the requests served in its own step, library rows' decode). One whose
prefill alone fits, but not beside the decode rows of the requests ahead, is admitted
only once most of them have finished: its Retry-After is that time, not the overshoot of
its TTFT, which promised the queue's first tokens (a retry then got another 429). The
real scheduler on a virtual clock (test_admission.VirtualServer): milliseconds."""

from __future__ import annotations

import pytest
from test_admission import BUDGET, MAX_SEQS, TRUE, VirtualServer, warm_up

from moska.server.admission import AdmissionController, EngineLimits, Load, RequestCost, Verdict
from moska.server.retry_drain import drain_s, shared_prefill, shares_fit

SLO = 1.0


def _near_the_line(adm: AdmissionController, share: float) -> RequestCost:
    """A library request whose predicted prefill alone is `share` of what fits (bisected
    on its library attention)."""
    target = share * adm.headroom * SLO
    lo, hi = 1, 1 << 16
    while hi - lo > 1:
        mid = (lo + hi) // 2
        alone = adm.predict(RequestCost(400, 8, mid), Load()).alone_s
        lo, hi = (mid, hi) if alone <= target else (lo, mid)
    return RequestCost(400, 8, lo)


@pytest.mark.parametrize(
    "ahead, steps",
    [
        # served in the new request's own step: their library prefill was left out (0.33x)
        ([RequestCost(100, 16, 4096)] * 2 + [RequestCost(30, 20)] * 4, 0),
        ([RequestCost(200, 16, 4096)] * 4 + [RequestCost(40, 24)] * 10, 1),
        # decoding library rows: their library attention was left out (0.72x)
        ([RequestCost(60, 30, 4096)] * 6 + [RequestCost(40, 30)] * 10, 2),
    ],
    ids=["shared-step", "queue", "library-decode"],
)
def test_idle_is_when_the_work_ahead_is_done(ahead, steps):
    """`idle_s` (a 429's drain when only an idle engine admits the request) against the
    scheduler run without the new request, with the step times it was given."""
    adm = AdmissionController(None, None, limits=EngineLimits(BUDGET, MAX_SEQS), prior=tuple(TRUE))
    server = VirtualServer(adm)
    for cost in ahead:
        server.submit(cost)
    for _ in range(steps):
        server.step()
    pred = adm.predict(RequestCost(100, 8, 8192), server.load())
    t0 = server.t
    server.run_until_idle()
    assert 0.8 < pred.idle_s / (server.t - t0) < 1.25, (pred.idle_s, server.t - t0)


def test_a_library_request_that_fits_alone_but_not_beside_the_rows_waits_for_them():
    adm = AdmissionController(None, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    server = VirtualServer(adm)
    warm_up(server)
    adm.ttft_slo = SLO
    fits = adm.headroom * SLO
    lib = _near_the_line(adm, 0.98)
    t0 = server.t
    admitted = sum(server.submit(RequestCost(150, 40))[1].accepted for _ in range(60))
    assert 10 < admitted < MAX_SEQS  # prefill-bound: rows decode, seq slots are left
    d = server.submit(lib)[1]
    assert d.verdict is Verdict.SLO
    pred = adm.predict(lib, server.load())
    assert pred.alone_s <= fits < pred.ttft_s  # not the "longer than the SLO alone" case
    shared = shared_prefill(pred, lib.prompt_tokens, adm.step_s, adm.limits)
    assert shared(pred.decoding[0][1]) > fits  # beside the burst's rows it misses
    assert d.drain_s == shares_fit(pred, fits, shared) > pred.clear_s
    while True:  # step until it is admitted: (seconds before that step, after it)
        before = server.t - t0
        server.step()
        if server.submit(lib)[1].accepted:
            after = server.t - t0
            break
    rows = len(server.load().running)
    assert rows < admitted // 2, rows  # admitted once most of the burst had finished
    assert 0.5 * before <= d.drain_s <= 2 * after, (d.drain_s, before, after)
    # the estimate before: the overshoot of its TTFT, about when the queue ahead was served
    old = drain_s(pred, fits=fits, risk=adm.library_risk, door_wait_s=0.0)
    assert old < 0.5 * before, (old, before, after)
    assert d.retry_after_ms == round(d.drain_s * 1000)


def test_the_drain_is_unchanged_when_its_prefill_fits_beside_the_rows():
    """A short library request fits beside the rows: its drain is the queue's, as before."""
    adm = AdmissionController(None, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    server = VirtualServer(adm)
    warm_up(server)
    adm.ttft_slo = SLO
    fits = adm.headroom * SLO
    lib = _near_the_line(adm, 0.3)
    for _ in range(60):
        server.submit(RequestCost(150, 40))
    pred = adm.predict(lib, server.load())
    shared = shared_prefill(pred, lib.prompt_tokens, adm.step_s, adm.limits)
    old = drain_s(pred, fits=fits, risk=adm.library_risk, door_wait_s=0.0)
    new = drain_s(pred, fits=fits, risk=adm.library_risk, door_wait_s=0.0, shared_s=shared)
    assert shared(pred.decoding[0][1]) <= fits
    assert new == old < pred.idle_s
