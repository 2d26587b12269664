"""Early rejection: the TTFT predictor and the accept/reject decision (plain Python)."""

from __future__ import annotations

import pytest

from moska.server.admission import AdmissionController, Load, Verdict

IDLE = Load(num_waiting=0, num_running=0, waiting_prefill_tokens=0)


def test_prior_prediction_idle():
    a = AdmissionController(None, None, prior_prefill_tps=1000.0, prior_decode_step_s=0.01)
    assert a.predict_ttft(500, IDLE) == pytest.approx(0.5 + 0.01)


def test_prediction_grows_with_queue_and_running():
    a = AdmissionController(None, None, prior_prefill_tps=1000.0, prior_decode_step_s=0.01)
    busy = Load(num_waiting=4, num_running=8, waiting_prefill_tokens=2000)
    assert a.predict_ttft(100, busy) == pytest.approx(2.1 + 5 * 0.01)
    assert a.predict_ttft(100, busy) > a.predict_ttft(100, IDLE)


def test_ema_learns_rates():
    a = AdmissionController(None, None, prior_prefill_tps=1e6, prior_decode_step_s=1.0, alpha=0.5)
    for _ in range(30):
        a.observe_step(0.02, prefill_tokens=0, num_decode=4)  # pure decode steps
    assert a.decode_step_s == pytest.approx(0.02, rel=1e-3)
    for _ in range(30):
        a.observe_step(0.12, prefill_tokens=1000, num_decode=4)  # 0.1 s of prefill
    assert a.prefill_tps == pytest.approx(10_000, rel=1e-2)
    a.observe_step(0.0, prefill_tokens=10, num_decode=0)  # ignored
    a.observe_step(0.1, prefill_tokens=0, num_decode=0)  # nothing happened: ignored
    assert a.decode_step_s == pytest.approx(0.02, rel=1e-3)


def test_fast_prefill_step_does_not_explode():
    a = AdmissionController(
        None, None, prior_prefill_tps=1000.0, prior_decode_step_s=0.05, alpha=1.0
    )
    a.observe_step(0.01, prefill_tokens=100, num_decode=3)  # faster than the decode estimate
    assert a.prefill_tps == pytest.approx(100 / 0.0025)


def test_reject_over_slo_with_retry_after():
    a = AdmissionController(1.0, None, prior_prefill_tps=1000.0, prior_decode_step_s=0.01)
    assert a.decide(100, IDLE).accepted
    d = a.decide(100, Load(3, 4, 3400))
    assert d.verdict is Verdict.SLO and not d.accepted
    assert d.predicted_ttft_s > 1.0 and d.retry_after_s == 3  # ceil(3.54 - 1)


def test_reject_over_queue():
    a = AdmissionController(None, 4)
    assert a.decide(10, Load(3, 0, 30)).accepted
    d = a.decide(10, Load(4, 0, 40))
    assert d.verdict is Verdict.QUEUE_FULL and d.retry_after_s >= 1
    # n choices are admitted together
    assert a.decide(10, Load(2, 0, 20), num_requests=3).verdict is Verdict.QUEUE_FULL


def test_n_choices_count_their_prefill():
    a = AdmissionController(0.5, None, prior_prefill_tps=1000.0, prior_decode_step_s=0.01)
    assert a.decide(100, IDLE, num_requests=4).accepted
    assert not a.decide(100, IDLE, num_requests=5).accepted


def test_bad_arguments():
    with pytest.raises(ValueError):
        AdmissionController(1.0, 1, prior_prefill_tps=0)
    with pytest.raises(ValueError):
        AdmissionController(1.0, 1, alpha=0)


def test_warmup_steps_are_not_folded_in():
    """A step that captured a CUDA graph (a one-off second) leaves the estimates alone."""
    a = AdmissionController(None, None, prior_prefill_tps=1000.0, prior_decode_step_s=0.01)
    a.observe_step(1.5, 0, 8, warmup=True)
    a.observe_step(1.5, 100, 8, warmup=True)
    assert a.decode_step_s == 0.01 and a.prefill_tps == 1000.0
    a.observe_step(1.5, 0, 8)
    assert a.decode_step_s > 0.01
