"""A 429's drain when the slowdown factor is what keeps a request out. Under a burst the
steps run slow (the event loop answering the burst shares the cores), the factor that
scales every predicted step rises, and a library request whose prefill alone fits on the
fit misses under that factor; once the burst is answered the steps run as the fit says,
the factor falls within a few steps and the request is admitted long before the engine
is idle. Its Retry-After is that time, not the idle drain. The real scheduler on a
virtual clock (test_admission.VirtualServer): milliseconds."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest
from test_admission import BUDGET, MAX_SEQS, VirtualServer, warm_up

from moska.server.admission import AdmissionController, EngineLimits, Load, RequestCost, Verdict
from moska.server.retry_drain import FactorFall, drain_s, factor_falls, shared_prefill

SLO = 1.0


class _Contended(random.Random):
    """The virtual server's noise source, times `slow` (the burst's contention)."""

    slow = 1.0

    def uniform(self, a: float, b: float) -> float:
        return self.slow * super().uniform(a, b)


def _alone_at(adm: AdmissionController, seconds: float, prompt: int = 200) -> RequestCost:
    """A library request whose prefill alone is predicted at `seconds` with the factor
    at 1 (bisected on its library attention)."""
    lo, hi = 1, 1 << 16
    while hi - lo > 1:
        mid = (lo + hi) // 2
        alone = adm.predict(RequestCost(prompt, 8, mid), Load()).alone_s / adm.slowdown
        lo, hi = (mid, hi) if alone <= seconds else (lo, mid)
    return RequestCost(prompt, 8, lo)


def _burst(slow: float, share: float):
    adm = AdmissionController(None, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    server = VirtualServer(adm)
    server.rng = rng = _Contended(0)
    warm_up(server)
    adm.ttft_slo = SLO
    rng.slow = slow  # the burst arrives: its steps run slow
    for _ in range(40):
        server.submit(RequestCost(100, 24))
    for _ in range(3):
        server.step()
    rng.slow = 1.0  # the burst is answered: the steps run as the fit says
    return adm, server, _alone_at(adm, share * adm.headroom * SLO)


@pytest.mark.parametrize("slow", [2.0, 2.5])
def test_a_request_kept_out_by_the_factor_is_promised_its_fall_not_idle(slow):
    adm, server, lib = _burst(slow, 0.7)
    fits = adm.headroom * SLO
    assert adm.slowdown > 1.4, adm.slowdown
    d = server.submit(lib)[1]
    assert d.verdict is Verdict.SLO
    pred = adm.predict(lib, server.load())
    assert pred.alone_s > fits  # under the factor now its prefill alone misses
    shared = shared_prefill(pred, lib.prompt_tokens, adm.step_s, adm.limits)
    t0 = server.t
    while True:  # step until it is admitted: (seconds before that step, after it)
        before = server.t - t0
        server.step()
        if server.submit(lib)[1].accepted:
            after = server.t - t0
            break
    assert server.sched.has_unfinished  # admitted before the engine was idle
    assert 0.5 * before <= d.drain_s <= 2 * after, (d.drain_s, before, after)
    # the estimate before: the idle drain
    old = drain_s(pred, fits=fits, risk=adm.library_risk, door_wait_s=0.0, shared_s=shared)
    assert old == pred.idle_s > 2 * after, (old, before, after)


def test_a_request_that_misses_even_unscaled_still_waits_for_idle():
    """The idle-only line holds: a prefill alone longer than what fits on the fit itself."""
    adm, server, lib = _burst(2.0, 1.3)
    fits = adm.headroom * SLO
    d = server.submit(lib)[1]
    pred = adm.predict(lib, server.load())
    assert d.verdict is Verdict.SLO and pred.alone_s > fits
    shared = shared_prefill(pred, lib.prompt_tokens, adm.step_s, adm.limits)
    old = drain_s(pred, fits=fits, risk=adm.library_risk, door_wait_s=0.0, shared_s=shared)
    assert d.drain_s == old == pred.idle_s


def test_the_factor_falls_back_toward_the_fit():
    fall = FactorFall(log_mean=0.6, log_var=0.04, alpha=0.25, deviations=0.5)
    r = fall.ratios(40)
    assert r[0] == 1.0 and r[-1] < 0.6 and all(b <= a + 1e-12 for a, b in pairwise(r))
    # nothing scaled: no fall, so a prefill alone that misses now misses for good
    flat = FactorFall(0.0, 0.0, 0.25, 0.5)
    assert flat.ratios(5) == [1.0] * 6
    adm = AdmissionController(1.0, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    pred = adm.predict(RequestCost(100, 8, 4096), Load(running=((5, 0),) * 4))
    shared = shared_prefill(pred, 100, adm.step_s, adm.limits)
    fits = 0.99 * pred.alone_s
    assert factor_falls(pred, fits, 1.0, shared, flat, 0.0) == pred.idle_s
    # with a falling factor it fits once the rows' steps have brought it down
    assert factor_falls(pred, fits, 1.0, shared, fall, 0.0) < pred.idle_s
