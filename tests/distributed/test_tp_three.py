"""Tensor parallelism over 3 ranks of a model with 6 query heads and 2 KV heads (tied
embeddings, attention biases): KV head 0 is replicated on ranks 0 and 1, which split its
3 query heads 2 + 1; rank 2 holds KV head 1 and its 3 query heads; the intermediate
features (128) and the vocabulary (256) split unevenly. Output equals one process's. Last,
a worker is killed mid-generation: the engine raises RankFailedError naming it within 10 s."""

from __future__ import annotations

import pytest
import torch
from tp_support import (
    DEVICES,
    EnginePair,
    build_checkpoint,
    engine_kwargs,
    greedy,
    kill_rank_mid_step,
    prefill_logits,
    rel_err,
)

from moska.distributed.errors import RankFailedError
from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(120)

MODEL = {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
         "attention_bias": True, "tie_word_embeddings": True}  # fmt: skip
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8], [200, 201], [7]]


@pytest.fixture(scope="module", params=DEVICES)
def engines(request, tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("tp3") / "m", seed=3, **MODEL)
    ref = LLMEngine.from_model(str(path), **engine_kwargs(request.param))
    pair = EnginePair(
        ref,
        lambda: LLMEngine.from_model(
            str(path), **engine_kwargs(request.param, tensor_parallel_size=3)
        ),
    )
    try:
        yield pair
    finally:
        pair.shutdown()


def test_shards_are_uneven_and_replicated(engines):
    _, tp = engines
    plan = tp.runner.model.plan
    assert (plan.q_heads, plan.kv_heads) == ((0, 2), (0, 1))
    assert plan.intermediate == (0, 43) and plan.vocab == (0, 86)
    assert tp.runner.cache.k.shape[-2] == 1


def test_logits_equal_one_process(engines):
    ref, tp = engines
    want = prefill_logits(ref, PROMPTS)
    got = prefill_logits(tp, PROMPTS)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-4


def test_greedy_tokens_equal_one_process(engines):
    ref, tp = engines
    assert greedy(tp, PROMPTS, 10) == greedy(ref, PROMPTS, 10)


def test_killed_rank_is_named_within_10_s(engines):
    _, tp = engines
    tp.add_request("long", [5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True))
    for _ in range(3):
        tp.step()
    kill_rank_mid_step(tp, 2)
    with pytest.raises(RankFailedError, match="rank 2"):  # at once, no collective
        tp.add_request("after", [1, 2], SamplingParams(max_tokens=2))
