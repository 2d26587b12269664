"""Tensor parallelism over 2 ranks (rank 0 is this process, rank 1 a spawned worker) on the
tiny Llama (4 query heads, 2 KV heads: one KV head per rank): fp32 logits and greedy tokens
equal one process's; library requests refused; each rank's cache holds its KV heads only."""

from __future__ import annotations

import pytest
import torch
from tp_support import DEVICES, build_checkpoint, engine_kwargs, greedy, prefill_logits, rel_err

from moska.engine.errors import RequestError
from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams

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


def test_library_request_is_refused(engines):
    _, tp = engines
    with pytest.raises(RequestError, match="tensor parallelism"):
        tp.add_request("lib", [1, 2, 3], SamplingParams(max_tokens=2), library="handbook")
    assert not tp.has_unfinished_requests()
