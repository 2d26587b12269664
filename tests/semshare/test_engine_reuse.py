"""SemShareKV in the engine (built-in tiny model, CPU, fp32): off changes nothing; on, a
prompt seen for the first time is computed in full (same tokens as the dense reference) and
stored, a near duplicate reuses its KV and says how many tokens in its output, an exact
repeat takes the first's blocks from the prefix cache (exact KV) and generates its tokens;
without the prefix cache an exact repeat is blended, chunk by chunk, and generates them
too."""

import random

import pytest

from moska import SamplingParams
from moska.model.reference import greedy_generate

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _prompts():
    rng = random.Random(0)
    a = [rng.randrange(0, 256) for _ in range(50)]
    b = list(a)
    b[30] = (b[30] + 1) % 256
    b = b[:10] + [5, 6, 7] + b[10:]  # an edit and an insertion: most tokens shift by 3
    return a, b


@pytest.fixture(scope="module")
def engines(plain_llm, reuse_llm):
    return plain_llm, reuse_llm


def test_reuse_off_is_the_plain_engine(engines):
    off, _ = engines
    a, b = _prompts()
    model = off.engine.loaded.model
    outs = off.generate([a, b], PARAMS)
    assert [o.outputs[0].token_ids for o in outs] == [greedy_generate(model, p, 6) for p in (a, b)]
    assert off.engine.semshare is None and all(o.num_reused_tokens == 0 for o in outs)


def test_reuse_on(engines):
    _, on = engines
    a, b = _prompts()
    model = on.engine.loaded.model
    first = on.generate([a], PARAMS)[0]
    assert first.num_reused_tokens == 0  # nothing stored yet: computed in full
    assert first.outputs[0].token_ids == greedy_generate(model, a, 6)
    stored = len(on.engine.semshare.store)
    assert on.engine.semshare.stats.stored >= 1 and stored >= 1
    near = on.generate([b], PARAMS)[0]
    assert 0 < near.num_reused_tokens < len(b) - 1
    assert len(on.engine.semshare.store) == stored  # a prompt that reused KV is not stored
    again = on.generate([a], PARAMS)[0]  # identical: planned, but its blocks are a's exact
    assert again.num_cached_tokens == 48  # KV in the prefix cache (3 full blocks), taken
    assert again.outputs[0].token_ids == greedy_generate(model, a, 6)
    on.engine.block_manager.check_integrity()


def test_bad_settings_name_the_field():
    from moska.config import EngineConfig

    with pytest.raises(ValueError, match="recompute fraction"):
        EngineConfig(semantic_reuse=True, semantic_recompute_fraction=1.5)
    with pytest.raises(ValueError, match="threshold"):
        EngineConfig(semantic_reuse=True, semantic_reuse_threshold=2.0)


def test_reuse_across_chunked_prefill():
    """Prompts longer than the step budget are blended chunk by chunk; an exact repeat still
    generates the dense reference's tokens and reuses KV in every chunk."""
    from moska import LLM

    llm = LLM(
        None,
        device="cpu",
        dtype="float32",
        attention="torch",
        num_kv_blocks=64,
        max_model_len=512,
        semantic_reuse=True,
        max_num_batched_tokens=24,
        max_num_seqs=4,
        enable_prefix_caching=False,  # an exact repeat would take the first's blocks
    )
    a, _ = _prompts()
    model = llm.engine.loaded.model
    assert llm.generate([a], PARAMS)[0].num_reused_tokens == 0
    again = llm.generate([a], PARAMS)[0]
    assert again.outputs[0].token_ids == greedy_generate(model, a, 6)
    # chunks [0, 24), [24, 48), [48, 50): each blends all but its last token, the last
    # chunk's 2 tokens are too few to blend
    assert llm.engine.semshare.stats.blended_tokens == 23 + 23
    assert again.num_reused_tokens > 30


def test_a_rejected_candidate_keeps_its_lru_place():
    """A plan whose candidate matches too few tokens reuses nothing: that reference must not
    become the most recently used (it would outlive references that are reused); a plan
    that reuses refreshes it."""
    import dataclasses
    import random as rnd

    from moska import LLM

    llm = LLM(None, semantic_reuse=True, device="cpu", dtype="float32", attention="torch",
              num_kv_blocks=64, max_model_len=512)  # fmt: skip
    reuse = llm.engine.semshare
    a, b = _prompts()
    c = [rnd.Random(1).randrange(0, 256) for _ in range(50)]
    llm.generate([a], PARAMS)
    llm.generate([c], PARAMS)  # stored after a: a is the least recently used
    reuse.flush()
    order = [r.token_ids.tolist() for r in reuse.store.lru_entries()]
    assert order == [a, c]
    strict = dataclasses.replace(reuse.config, min_reuse_fraction=1.0)
    reuse.config, default = strict, reuse.config
    assert reuse.plan(b) is None  # a is found, not every one of b's tokens matches it
    assert reuse.store.stats.hits >= 1
    assert [r.token_ids.tolist() for r in reuse.store.lru_entries()] == [a, c]
    reuse.config = default
    plan = reuse.plan(b)
    assert plan is not None and plan.ref.token_ids.tolist() == a
    assert [r.token_ids.tolist() for r in reuse.store.lru_entries()] == [c, a]
