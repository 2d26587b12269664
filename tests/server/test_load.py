"""The bounded load test, small: tight SLO so some requests get 429; every accepted one
completes; none fails or hangs."""

from __future__ import annotations

import pytest

from moska.bench.load import run_load

pytestmark = pytest.mark.timeout(120)


def test_load_small_real_engine():
    from moska.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_model(None, device="cpu", max_model_len=1024, num_kv_blocks=1024)
    result = run_load(
        num_requests=40,
        concurrency=40,
        max_tokens=8,
        ttft_slo=0.3,
        engine=engine,
        request_timeout_s=60,
    )
    print(result.table())
    result.check()
    assert result.accepted > 0 and result.rejected > 0


def test_overload_slow_engine_rejects_with_retry_after():
    """A slow engine (50 ms per step): the measured step time makes admission reject."""
    from fake_engine import FakeEngine

    engine = FakeEngine(step_delay=0.05)
    result = run_load(
        num_requests=40,
        concurrency=40,
        max_tokens=10,
        ttft_slo=0.2,
        engine=engine,
        request_timeout_s=30,
    )
    result.check()
    assert result.rejected > 0 and result.accepted > 0
