"""Each sampling field through the official `openai` client on the real server: honoured
(checked against the engine run directly, or the reference model), or a 400 naming it."""

from __future__ import annotations

import math

import openai
import pytest
import torch

from moska.model.reference import DenseAttention

PROMPT = [11, 12, 13, 11, 12, 13, 11, 12]


@torch.inference_mode()
def _ref_greedy(real_engine, prompt, n, presence=0.0, frequency=0.0, repetition=1.0):
    """Greedy tokens of the reference model with OpenAI / vLLM penalties, in plain Python."""
    model = real_engine.loaded.model
    attn = DenseAttention(model.config.sm_scale)
    ids, pos, out = torch.tensor(prompt), torch.arange(len(prompt)), []
    for _ in range(n):
        row = model.compute_logits(model(ids, pos, attn)[-1:])[0].float().tolist()
        for t in set(prompt) | set(out):
            if repetition != 1.0:
                row[t] = row[t] / repetition if row[t] > 0 else row[t] * repetition
            c = out.count(t)
            row[t] -= frequency * c + presence * (c > 0)
        out.append(max(range(len(row)), key=row.__getitem__))
        ids, pos = torch.tensor(out[-1:]), pos[-1:] + 1
    return out


@pytest.mark.parametrize(
    "fields, extra",
    [
        ({"presence_penalty": -2.0}, {}),
        ({"frequency_penalty": -1.5, "presence_penalty": 0.5}, {}),
        ({}, {"repetition_penalty": 0.2}),
    ],
)
def test_penalties_match_reference(client, model, real_engine, fields, extra):
    r = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        **fields,
        extra_body={**extra, "ignore_eos": True},
    )
    kw = {
        "presence": fields.get("presence_penalty", 0.0),
        "frequency": fields.get("frequency_penalty", 0.0),
        "repetition": extra.get("repetition_penalty", 1.0),
    }
    want = _ref_greedy(real_engine, PROMPT, 8, **kw)
    assert want != _ref_greedy(real_engine, PROMPT, 8)  # the setting changes the output
    assert r.choices[0].text == real_engine.tokenizer.decode(want)


def test_logit_bias_forces_a_token(client, model, real_engine):
    r = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logprobs=0,
        logit_bias={"42": 100},
    )
    lp = r.choices[0].logprobs
    assert lp.tokens == [real_engine.tokenizer.decode([42])] * 4
    plain = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0
    )
    assert plain.choices[0].logprobs.tokens != lp.tokens


@pytest.mark.parametrize(
    "body, param",
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logit_bias": {"3": 101}}, "logit_bias"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"bad_words": ["x"]}, "bad_words"),
    ],
)
def test_completion_field_rejected_with_its_name(client, model, body, param):
    known = {"logit_bias", "presence_penalty", "frequency_penalty", "suffix", "best_of"}
    known |= {"logprobs", "max_tokens", "stream", "n"}
    direct = {k: v for k, v in body.items() if k in known}
    extra = {k: v for k, v in body.items() if k not in known}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=model, prompt="Hello", **{"max_tokens": 4, **direct}, extra_body=extra
        )
    assert e.value.body["param"] == param


def test_chat_top_logprobs_needs_logprobs(client, model):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=msgs, max_tokens=2, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=msgs, max_tokens=2, logprobs=True, top_logprobs=21
        )
    assert e.value.body["param"] == "top_logprobs"
    r = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=2, logprobs=True, top_logprobs=3, temperature=0
    )
    assert all(len(t.top_logprobs) == 3 for t in r.choices[0].logprobs.content)


def test_min_p_is_honoured(client, model):
    # min_p 1.0 keeps only the most likely token: sampling at temperature 1 becomes greedy
    greedy = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=1.0, extra_body={"min_p": 1.0}
    )
    assert r.choices[0].text == greedy.choices[0].text
    free = {
        client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=s)
        .choices[0]
        .text
        for s in range(3)
    }
    assert free != {greedy.choices[0].text}  # without min_p the seeds do differ


@torch.inference_mode()
def _ref_logprobs(real_engine, ids: list[int]) -> torch.Tensor:
    model = real_engine.loaded.model
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), DenseAttention(model.config.sm_scale))
    return torch.log_softmax(model.compute_logits(hidden).float(), dim=-1)  # [P, V]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_with_logprobs_scores_the_prompt(client, model, real_engine, max_tokens):
    # lm-evaluation-harness' loglikelihood request
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, echo=True, logprobs=1, temperature=0
    )
    c = r.choices[0]
    lp = c.logprobs
    prompt_text = real_engine.tokenizer.decode(PROMPT)
    assert c.text.startswith(prompt_text)
    assert len(lp.token_logprobs) == len(PROMPT) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = _ref_logprobs(real_engine, PROMPT)
    for pos in range(1, len(PROMPT)):
        want = float(ref[pos - 1, PROMPT[pos]])
        assert math.isclose(lp.token_logprobs[pos], want, abs_tol=2e-3), pos
        assert len(lp.top_logprobs[pos]) >= 1
    assert r.usage.completion_tokens == max_tokens
    if max_tokens == 0:
        assert c.text == prompt_text and c.finish_reason == "length"


def test_echo_streaming_sends_the_prompt_first(client, model, real_engine):
    chunks = list(
        client.completions.create(
            model=model, prompt="Hello there", max_tokens=3, echo=True, temperature=0, stream=True
        )
    )
    plain = client.completions.create(
        model=model, prompt="Hello there", max_tokens=3, temperature=0
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert chunks[0].choices[0].text == "Hello there"
    assert text == "Hello there" + plain.choices[0].text


def test_best_of_returns_the_most_likely_candidates(client, model):
    kw = {"model": model, "prompt": PROMPT, "max_tokens": 5, "temperature": 1.0, "seed": 3}
    r = client.completions.create(best_of=4, n=2, logprobs=0, **kw)
    assert [c.index for c in r.choices] == [0, 1]
    cum = [sum(c.logprobs.token_logprobs) for c in r.choices]
    # the 4 candidates are the n=4 choices of the same seed: the 2 returned are their best
    four = client.completions.create(n=4, logprobs=0, **kw)
    all_cum = sorted((sum(c.logprobs.token_logprobs) for c in four.choices), reverse=True)
    assert cum == pytest.approx(all_cum[:2], abs=1e-4)
    assert r.usage.completion_tokens == four.usage.completion_tokens
    no_lp = client.completions.create(best_of=4, n=1, **kw)
    assert no_lp.choices[0].logprobs is None
    assert no_lp.choices[0].text in {c.text for c in four.choices}
