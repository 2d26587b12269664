"""logit_bias, logits processors, penalties and min_p against a plain-Python reference, in
the sampler and through the engine (also with asynchronous scheduling), and prompt logprobs
against a full forward of the reference model."""

import itertools
import math
import random

import pytest
import torch

from moska import LLM, SamplingParams
from moska.engine.sampler import Sampler
from moska.engine.sampling_params import SamplingParamsError
from moska.model.reference import DenseAttention

KW = {"device": "cpu", "dtype": "float32", "attention": "torch"}


# ---------------------------------------------------------------- plain-Python reference


def ref_process(row: list[float], p: SamplingParams, prompt: list[int], output: list[int]):
    """One row of logits through logit_bias, processors and penalties, token by token."""
    row = list(row)
    for t, b in p.logit_bias:
        row[t] += b
    for proc in p.logits_processors:
        row = proc(list(output), torch.tensor(row)).tolist()
    seen = set(prompt) | set(output)
    for t in seen:  # the other tokens keep their logits
        if p.repetition_penalty != 1.0:
            r = p.repetition_penalty
            row[t] = row[t] / r if row[t] > 0 else row[t] * r
        c = output.count(t)
        row[t] -= p.frequency_penalty * c + p.presence_penalty * (1 if c else 0)
    return row


def ref_allowed(row: list[float], p: SamplingParams) -> set[int]:
    """Tokens that may be sampled after temperature and min_p."""
    scaled = [x / p.temperature for x in row]
    m = max(scaled)
    probs = [math.exp(x - m) for x in scaled]
    total = sum(probs)
    probs = [q / total for q in probs]
    top = max(probs)
    return {t for t, q in enumerate(probs) if q >= p.min_p * top}


def _random_case(rng: random.Random, vocab: int):
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
    output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
    params = SamplingParams(
        temperature=0,
        presence_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
        frequency_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
        repetition_penalty=rng.choice([1.0, rng.uniform(0.5, 2.0)]),
        logit_bias={str(rng.randrange(vocab)): rng.uniform(-100, 100) for _ in range(2)},
    )
    return prompt, output, params


def test_processing_matches_reference_row_by_row():
    rng = random.Random(0)
    vocab = 40
    logits = torch.randn(16, vocab, generator=torch.Generator().manual_seed(0)) * 3
    cases = [_random_case(rng, vocab) for _ in range(16)]
    cases[3] = (cases[3][0], cases[3][1], SamplingParams(temperature=0))  # a plain row
    params = [c[2] for c in cases]
    prompts = [c[0] for c in cases]
    outputs = [c[1] for c in cases]
    got = Sampler._process(logits.clone(), params, prompts, outputs)
    for i, (prompt, output, p) in enumerate(cases):
        want = ref_process(logits[i].tolist(), p, prompt, output)
        assert torch.allclose(got[i], torch.tensor(want), atol=1e-4), i
    # greedy picks the processed argmax, logprobs stay those of the raw logits
    params = [replace_lp(p) for p in params]
    out = Sampler()(logits, params, [f"r{i}" for i in range(16)], prompts, outputs)
    raw = torch.log_softmax(logits, -1)
    for i in range(16):
        assert out.token_ids[i] == int(got[i].argmax())
        assert math.isclose(out.logprobs[i][0], float(raw[i, out.token_ids[i]]), abs_tol=1e-5)


def replace_lp(p: SamplingParams) -> SamplingParams:
    from dataclasses import replace

    return replace(p, logprobs=1)


def test_untouched_rows_and_input_logits_are_not_modified():
    logits = torch.randn(2, 10)
    before = logits.clone()
    p = SamplingParams(temperature=0, logit_bias={0: 100})
    out = Sampler()(logits, [p, SamplingParams(temperature=0)], ["a", "b"])
    assert out.token_ids[0] == 0 and out.token_ids[1] == int(before[1].argmax())
    assert torch.equal(logits, before)


def test_processor_order_bias_then_processor_then_penalty():
    seen = {}

    def proc(output_ids, row):
        seen["row"] = row.clone()
        seen["ids"] = output_ids
        row[5] = 7.0
        return row

    logits = torch.zeros(1, 8)
    p = SamplingParams(
        temperature=0, logit_bias={2: 3.0}, logits_processors=[proc], frequency_penalty=2.0
    )
    out = Sampler()(logits, [p], ["a"], [[1]], [[5, 5]])
    assert seen["row"][2] == 3.0 and seen["ids"] == [5, 5]  # bias before the processor
    # the processor's 7 at token 5, minus 2 * 2 for its two occurrences, is below 3 + 0
    assert out.token_ids == [2]


def test_min_p_keeps_exactly_the_reference_set():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 30, generator=g) * 2
    p = SamplingParams(temperature=0.8, min_p=0.3)
    allowed = ref_allowed(logits[0].tolist(), p)
    assert 1 < len(allowed) < 30
    s = Sampler(seed=3)
    drawn = {s(logits, [p], ["m"]).token_ids[0] for _ in range(400)}
    assert drawn <= allowed and len(drawn) > 1


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {3: 101}}, "logit_bias"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"logits_processors": [3]}, "logits_processors"),
    ],
)
def test_out_of_range_names_the_field(kwargs, param):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_logits_processors_do_not_change_equality():
    assert SamplingParams(logits_processors=(lambda ids, x: x,)) == SamplingParams()
    assert SamplingParams(logit_bias={"3": 1}).logit_bias == ((3, 1.0),)


# ---------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def engines():
    sync = LLM(None, num_kv_blocks=256, async_scheduling=False, **KW)
    asyn = LLM(None, num_kv_blocks=256, async_scheduling=True, **KW)
    assert asyn.engine.async_scheduling
    return sync, asyn


@torch.inference_mode()
def ref_generate(model, prompt: list[int], params: SamplingParams, n: int) -> list[int]:
    """Greedy decoding with the reference attention and ref_process, one token per forward."""
    attn = DenseAttention(model.config.sm_scale)
    ids, positions = torch.tensor(prompt), torch.arange(len(prompt))
    out: list[int] = []
    for _ in range(n):
        row = model.compute_logits(model(ids, positions, attn)[-1:])[0].tolist()
        row = ref_process(row, params, prompt, out)
        out.append(max(range(len(row)), key=row.__getitem__))
        ids, positions = torch.tensor(out[-1:]), positions[-1:] + 1
    return out


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, repetition_penalty=1.8),
        SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=0.5),
        SamplingParams(temperature=0, presence_penalty=-2.0, logit_bias={7: 5.0, 9: -100}),
    ],
)
def test_engine_matches_reference_sync_and_async(engines, params):
    from dataclasses import replace

    params = replace(params, max_tokens=12, ignore_eos=True)
    prompts = [[1, 5, 9, 5, 5, 12], [3, 3, 3, 40, 41], [200, 7]]
    model = engines[0].engine.loaded.model
    want = [ref_generate(model, p, params, 12) for p in prompts]
    plain = engines[0].generate(prompts, replace(params, repetition_penalty=1.0,
                                                 frequency_penalty=0.0, presence_penalty=0.0,
                                                 logit_bias={}))  # fmt: skip
    assert [o.outputs[0].token_ids for o in plain] != want  # the settings change something
    for llm in engines:
        got = llm.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in got] == want


def test_logits_processor_sees_real_history_with_async_scheduling(engines):
    _, asyn = engines
    histories: list[list[int]] = []
    in_flight: list[int] = []  # the request's tokens in flight as its processor runs

    def ban_repeats(output_ids, row):
        histories.append(list(output_ids))
        in_flight.append(eng.scheduler.get_request("proc").num_in_flight)
        if output_ids:
            row[output_ids[-1]] = float("-inf")
        return row

    # a plain request beside it keeps decode steps running ahead when they can
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                            logits_processors=(ban_repeats,))  # fmt: skip
    eng = asyn.engine
    eng.add_request("proc", [4, 4, 4, 4], params)
    eng.add_request("plain", [9, 8, 7], SamplingParams(temperature=0, max_tokens=30))
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
    tokens = outs["proc"].outputs[0].token_ids
    assert len(histories) == 10 and histories == [tokens[:i] for i in range(10)]
    assert in_flight == [0] * 10 and all(t >= 0 for h in histories for t in h)
    assert all(a != b for a, b in itertools.pairwise(tokens))


def test_engine_rejects_logit_bias_outside_vocab(engines):
    eng = engines[0].engine
    vocab = eng.model_config.vocab_size
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        eng.add_request("bad-bias", [1, 2], SamplingParams(logit_bias={vocab: 1.0}))
    assert not eng.has_unfinished_requests()


# ---------------------------------------------------------------- prompt logprobs


@torch.inference_mode()
def ref_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    ids = torch.tensor(prompt)
    hidden = model(ids, torch.arange(len(ids)), DenseAttention(model.config.sm_scale))
    return torch.log_softmax(model.compute_logits(hidden), dim=-1)  # [P, V]


def test_prompt_logprobs_match_full_forward_with_chunks_and_prefix_cache():
    # a 4-token budget splits the prompt over several steps; the second request has the same
    # prompt, whose full blocks the prefix cache holds by then
    llm = LLM(None, num_kv_blocks=64, block_size=4, max_num_batched_tokens=8, max_num_seqs=4, **KW)
    rng = random.Random(2)
    prompt = [rng.randrange(256) for _ in range(27)]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    computed = lambda: llm.engine.stats().prompt_tokens_computed
    first = llm.generate([prompt], params)[0]
    c0 = computed()
    second = llm.generate([prompt], params)[0]
    assert computed() - c0 == len(prompt)  # no prefix-cache hit: every row computed
    ref = ref_prompt_logprobs(llm.engine.loaded.model, prompt)
    for out in (first, second):
        lps = out.prompt_logprobs
        assert lps is not None and len(lps) == len(prompt) and lps[0] is None
        for pos in range(1, len(prompt)):
            e = lps[pos]
            assert e.token_id == prompt[pos]
            assert math.isclose(e.logprob, float(ref[pos - 1, prompt[pos]]), abs_tol=1e-4)
            top = ref[pos - 1].topk(3)
            assert list(e.top) == top.indices.tolist()
            assert all(math.isclose(e.top[t], float(v), abs_tol=1e-4)
                       for t, v in zip(top.indices.tolist(), top.values.tolist()))  # fmt: skip
    c1 = computed()
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2))[0]
    assert computed() - c1 < len(prompt)  # the cache did hold the prompt's blocks
    assert plain.prompt_logprobs is None
    assert plain.outputs[0].token_ids == first.outputs[0].token_ids
