"""Tensor parallelism over 2 ranks (rank 0 is this process, rank 1 a spawned worker) on the
tiny Llama (4 query heads, 2 KV heads: one KV head per rank): fp32 logits and greedy tokens
equal one process's; each rank's cache holds its KV heads only (library requests:
test_tp_library.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from tp_support import DEVICES, build_checkpoint, engine_kwargs, greedy, prefill_logits, rel_err

from moska.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.timeout(120)

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [40, 41, 42], [99]]


@pytest.fixture(scope="module", params=DEVICES)
def engines(request, tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("tp2") / "m")
    ref = LLMEngine.from_model(str(path), **engine_kwargs(request.param))
    tp = LLMEngine.from_model(str(path), **engine_kwargs(request.param, tensor_parallel_size=2))
    try:
        yield ref, tp
    finally:
        tp.shutdown()


def test_logits_equal_one_process(engines):
    ref, tp = engines
    want = prefill_logits(ref, PROMPTS)
    got = prefill_logits(tp, PROMPTS)
    assert got.shape == want.shape == (sum(map(len, PROMPTS)), 256)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 1e-4


def test_greedy_tokens_equal_one_process(engines):
    ref, tp = engines
    # chunked prefill across steps (8-token budget), then batched decode
    want = greedy(ref, PROMPTS, 12)
    got = greedy(tp, PROMPTS, 12)
    assert got == want
    assert len(got["g0"]) == 12


def test_each_rank_caches_its_kv_heads(engines):
    ref, tp = engines
    assert ref.runner.cache.k.shape[-2] == 2
    assert tp.runner.cache.k.shape[-2] == 1  # [L, blocks, bs, Hkv local, D]
    assert tp.runner.num_blocks == ref.runner.num_blocks


def test_server_answers_errors_when_a_rank_dies(engines, caplog):
    """Last in this file: it kills rank 1. A request in flight ends with an error JSON, the
    next is a 503 naming the rank, within 10 s, and the log names the rank."""
    import httpx

    from moska.server.app import create_app
    from moska.server.background import background_server
    from moska.server.settings import ServerSettings

    _, tp = engines
    app = create_app(tp, ServerSettings())
    body = {"model": tp.model_name, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        ok = client.post("/v1/completions", json=body)
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["choices"][0]["text"]) >= 0
        os.kill(tp.dist.worker_pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        failed = client.post(
            "/v1/completions", json={**body, "max_tokens": 300, "ignore_eos": True}
        )
        after = client.post("/v1/completions", json=body)
        assert time.monotonic() - t0 < 10
    assert failed.status_code in (500, 503), failed.text
    assert "error" in failed.json()
    assert after.status_code == 503, after.text
    assert after.json()["error"]["code"] == "rank_failed"
    assert "rank 1" in after.json()["error"]["message"]
    assert any("rank 1" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
