"""The engine end to end on the built-in tiny model (CPU, plain-PyTorch attention):
continuous batching, chunked prefill, prefix caching and preemption must not change what a
request generates, compared with a dense single-sequence reference."""

import random

import pytest
import torch

from moska import LLM, SamplingParams
from moska.engine.errors import PromptTooLongError, RequestError
from moska.model.reference import greedy_generate


@pytest.fixture(scope="module")
def llm():
    return LLM(None, device="cpu", dtype="float32", attention="torch", num_kv_blocks=256)


def _prompts(n, lo=3, hi=40, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def test_greedy_matches_dense_reference(llm):
    model = llm.engine.loaded.model
    prompts = _prompts(5)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_generate(model, p, 12)


def test_chunked_prefill_and_small_budget_same_tokens():
    small = LLM(
        None,
        device="cpu",
        dtype="float32",
        attention="torch",
        num_kv_blocks=256,
        max_num_batched_tokens=16,
        max_num_seqs=3,
    )
    prompts = _prompts(6, lo=20, hi=70, seed=1)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params)]
    model = small.engine.loaded.model
    assert got == [greedy_generate(model, p, 8) for p in prompts]


def test_preemption_keeps_results():
    tight = LLM(None, device="cpu", dtype="float32", attention="torch", num_kv_blocks=12)
    prompts = _prompts(6, lo=20, hi=40, seed=2)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    model = tight.engine.loaded.model
    assert got == [greedy_generate(model, p, 20) for p in prompts]
    tight.engine.block_manager.check_integrity()


def test_prefix_cache_reuse_same_output(llm):
    base = _prompts(1, lo=50, hi=51, seed=3)[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate([base], params)[0].outputs[0].token_ids
    again = llm.generate([base + [1, 2, 3]], params)[0].outputs[0].token_ids
    model = llm.engine.loaded.model
    assert first == greedy_generate(model, base, 6)
    assert again == greedy_generate(model, base + [1, 2, 3], 6)


def test_text_prompt_stop_string_and_max_tokens(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate("Hello moska", params)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    text = full.text
    stop = text[5:8]
    if stop and stop not in text[:5]:
        cut = llm.generate(
            "Hello moska",
            SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
        )[0].outputs[0]
        assert cut.finish_reason == "stop"
        assert cut.text == text[: text.index(stop)]


def test_stop_token_ids(llm):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    toks = llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids
    stop_tok = toks[4]
    first = toks.index(stop_tok)
    out = llm.generate(
        [[5, 6, 7]],
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_tok]),
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[:first] == toks[:first]
    assert stop_tok not in out.token_ids[:first]


def test_seeded_sampling_reproducible_and_n(llm):
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=11, n=2, ignore_eos=True)
    a = llm.generate("abc", params)[0]
    b = llm.generate("abc", params)[0]
    assert len(a.outputs) == 2
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_logprobs_reported(llm):
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=2, ignore_eos=True)
    c = llm.generate([[9, 8, 7]], params)[0].outputs[0]
    assert len(c.logprobs) == 4
    for lp, tok in zip(c.logprobs, c.token_ids):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 2
        assert tok in lp.top  # greedy: the chosen token is the most likely


def test_streaming_deltas_add_up(llm):
    eng = llm.engine
    eng.add_request(
        "s1", "stream me", SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    )
    text, toks, final = "", [], None
    while eng.has_unfinished_requests():
        for out in eng.step():
            text += out.new_text
            toks += out.new_token_ids
            final = out
    assert final.finished and toks == final.outputs[0].token_ids
    assert text == final.outputs[0].text


def test_bad_requests_raise_typed_errors(llm):
    with pytest.raises(PromptTooLongError):
        llm.engine.add_request("x", [1] * 10, SamplingParams(max_tokens=10**6))
    with pytest.raises(RequestError):
        llm.engine.add_request("y", [10**6], SamplingParams())
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks(llm):
    eng = llm.engine
    eng.add_request("ab", list(range(40)), SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.abort_request("ab")
    assert not eng.has_unfinished_requests()
    eng.block_manager.check_integrity()
    assert eng.scheduler.num_running == 0


def test_default_model_is_deterministic(tmp_path, monkeypatch):
    from moska.model import default as d

    monkeypatch.setenv("MOSKA_HOME", str(tmp_path))
    path = d.default_model_dir()
    from safetensors.torch import load_file

    w = load_file(str(path / "model.safetensors"))
    ref = d._weights(d._SEED)
    assert set(w) == set(ref)
    assert all(torch.equal(w[k], ref[k]) for k in w)
