"""Asynchronous scheduling (the next step queued before this step's tokens reach the host)
must not change what any request generates: same tokens, finish reasons, logprobs and
streamed deltas as the synchronous engine, also with stop tokens and strings found a step
late, preemption, prefix caching, aborts while a step is in flight and seeded sampling."""

import random

import pytest

from moska import LLM, SamplingParams
from moska.model.reference import greedy_generate

# max_model_len: small (positions only; the longest request below is 68 tokens)
KW = {"device": "cpu", "dtype": "float32", "attention": "torch", "max_model_len": 192}


@pytest.fixture(scope="module")
def engines():
    sync = LLM(None, num_kv_blocks=256, async_scheduling=False, **KW)
    asyn = LLM(None, num_kv_blocks=256, async_scheduling=True, **KW)
    assert asyn.engine.async_scheduling and not sync.engine.async_scheduling
    return sync, asyn


def _prompts(n, lo=3, hi=40, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        for cx, cy in zip(x.outputs, y.outputs, strict=True):
            assert cx.token_ids == cy.token_ids
            assert cx.finish_reason == cy.finish_reason
            assert cx.text == cy.text
            assert all(t >= 0 for t in cy.token_ids)  # real token ids only


def test_greedy_matches_reference_and_sync(engines):
    sync, asyn = engines
    prompts = _prompts(6)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 2, 5, 9)]
    # greedy: a shorter run is a prefix of the longest, so one reference run per prompt
    model = asyn.engine.loaded.model
    ref = [greedy_generate(model, prompt, params[-1].max_tokens) for prompt in prompts]
    for p in params:
        got = asyn.generate(prompts, p)
        _same(sync.generate(prompts, p), got)
        for r, o in zip(ref, got, strict=True):
            assert o.outputs[0].token_ids == r[: p.max_tokens]
    assert asyn.engine._in_flight is None and not asyn.engine.has_unfinished_requests()
    asyn.engine.block_manager.check_integrity()


def test_chunked_prefill_preemption_and_prefix_cache():
    prompts = _prompts(6, lo=20, hi=60, seed=2)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = []
    for mode in (False, True):
        tight = LLM(
            None,
            num_kv_blocks=8,  # 128 tokens for 3 running requests of up to 68: preemptions
            max_num_batched_tokens=16,
            max_num_seqs=3,
            async_scheduling=mode,
            **KW,
        )
        preempted = _count_preemptions(tight.engine.scheduler)
        outs.append(tight.generate(prompts, params))
        # the same prompts again: prefix-cache hits on blocks registered while steps ran ahead
        outs.append(tight.generate(prompts, params))
        tight.engine.block_manager.check_integrity()
        assert preempted, "the cache must be tight enough to preempt"
    _same(outs[0], outs[2])
    _same(outs[0], outs[1])
    _same(outs[0], outs[3])


def _count_preemptions(scheduler) -> list[str]:
    """The ids preempted by each schedule() from now on (appended to the returned list)."""
    preempted: list[str] = []
    schedule = scheduler.schedule

    def counting():
        out = schedule()
        preempted.extend(r.request_id for r in out.preempted)
        return out

    scheduler.schedule = counting
    return preempted


def test_stop_tokens_and_strings_found_a_step_late(engines):
    sync, asyn = engines
    prompt = [[5, 6, 7], [1, 2, 3, 4], [9]]
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    toks = [o.outputs[0].token_ids for o in sync.generate(prompt, free)]
    stops = [toks[0][3], toks[1][6]]
    for min_tokens in (0, 5):
        p = SamplingParams(
            temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=stops,
            min_tokens=min_tokens,
        )  # fmt: skip
        got = asyn.generate(prompt, p)
        _same(sync.generate(prompt, p), got)
        assert any(o.outputs[0].finish_reason == "stop" for o in got)
    text = sync.generate("Hello moska", free)[0].outputs[0].text
    assert len(text) >= 7, text
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[text[4:7]])
    _same(sync.generate("Hello moska", p), asyn.generate("Hello moska", p))
    # a stop token as the very last allowed token: "stop", not "length"
    last = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, stop_token_ids=[toks[0][3]])
    got = asyn.generate([[5, 6, 7]], last)[0].outputs[0]
    assert got.finish_reason == "stop" and got.token_ids == toks[0][:3]
    asyn.engine.block_manager.check_integrity()


def test_logprobs_seeds_and_streaming(engines):
    sync, asyn = engines
    p = SamplingParams(temperature=0.8, max_tokens=10, seed=3, n=2, logprobs=2, ignore_eos=True)
    a, b = sync.generate("abc", p)[0], asyn.generate("abc", p)[0]
    _same([a], [b])
    for ca, cb in zip(a.outputs, b.outputs):
        assert [(x.token_id, x.top) for x in ca.logprobs] == [
            (x.token_id, x.top) for x in cb.logprobs
        ]
    eng = asyn.engine
    eng.add_request(
        "s1", "stream me", SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    )
    toks, text, final, steps = [], "", None, 0
    while eng.has_unfinished_requests():
        steps += 1
        for out in eng.step():
            assert all(t >= 0 for t in out.new_token_ids)  # real token ids only
            toks += out.new_token_ids
            text += out.new_text
            final = out
    assert final.finished and toks == final.outputs[0].token_ids and len(toks) == 15
    assert text == final.outputs[0].text
    assert steps == 16  # one step more than tokens: the last step's tokens come a call later


def test_abort_while_a_step_is_in_flight(engines):
    _, asyn = engines
    eng = asyn.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    eng.add_request("ab", list(range(40)), params)
    eng.add_request(
        "keep", list(range(7)), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    )
    eng.step()
    eng.step()
    assert eng._in_flight is not None
    eng.abort_request("ab")
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert all(o.request_id == "keep" for o in outs)
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 6
    assert eng._in_flight is None and eng.scheduler.num_running == 0
    eng.block_manager.check_integrity()


def test_library_steps_mixed_with_plain_steps(tmp_path):
    """Library steps wait for their tokens (routing reports); one launched while a plain
    step is in flight reads that step's tokens on the device."""
    docs = [("a.md", "Shared context for every request. " * 4), ("b.md", "Another document.")]
    runs = []
    for mode in (False, True):
        llm = LLM(None, num_kv_blocks=256, library_root=str(tmp_path / str(mode)),
                  async_scheduling=mode, **KW)  # fmt: skip
        llm.engine.libraries.build("docs", docs, chunk_size=16, mode="prefix")
        eng = llm.engine
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        eng.add_request("plain0", [3, 4, 5], params)
        eng.add_request("plain1", [7, 8], params)
        done, routed = {}, {}
        steps = 0
        while eng.has_unfinished_requests():
            steps += 1
            if steps == 3:  # the plain requests are decoding, maybe with a step in flight
                eng.add_request("lib", [1, 2, 3], params, library="docs", top_k_chunks=2)
            for out in eng.step():
                if out.routed_chunks is not None:
                    routed[out.request_id] = out.routed_chunks
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        eng.block_manager.check_integrity()
        runs.append((done, routed))
    assert runs[0] == runs[1] and set(runs[0][0]) == {"plain0", "plain1", "lib"}
    assert len(runs[1][1]["lib"]) == 2
