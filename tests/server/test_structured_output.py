"""Structured output over HTTP on the tiny random model at temperature 1: every output
parses and matches its grammar, and ends with "stop" well before max_tokens."""

from __future__ import annotations

import json
import re

import openai
import pytest

pytestmark = pytest.mark.server

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "rank": {"type": "integer"},
        "sunny": {"type": "boolean"},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "size": {"enum": ["S", "M", "L"]},
    },
    "required": ["city", "rank", "sunny", "scores", "size"],
}
REGEX = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


def check_schema(value) -> None:
    """SCHEMA, checked by hand."""
    assert isinstance(value, dict) and set(value) == set(SCHEMA["required"])
    assert isinstance(value["city"], str) and len(value["city"]) <= 10
    assert isinstance(value["rank"], int) and not isinstance(value["rank"], bool)
    assert isinstance(value["sunny"], bool)
    assert isinstance(value["scores"], list) and len(value["scores"]) <= 3
    assert all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value["scores"])
    assert value["size"] in ("S", "M", "L")


def test_json_object(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        response_format={"type": "json_object"},
        temperature=1.0,
        n=3,
        seed=11,
        max_tokens=900,
    )
    assert len(r.choices) == 3
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize("strict", [True, None])
def test_json_schema(client, model, strict):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
    if strict is not None:
        fmt["json_schema"]["strict"] = strict
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, response_format=fmt, temperature=1.0, n=3, max_tokens=600
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        check_schema(json.loads(choice.message.content))


def test_guided_fields_on_completions(client, model):
    for extra, check in [
        ({"guided_json": json.dumps(SCHEMA)}, lambda t: check_schema(json.loads(t))),
        ({"guided_json": SCHEMA}, lambda t: check_schema(json.loads(t))),
        ({"guided_regex": REGEX}, lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
        ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green") or pytest.fail(t)),
    ]:
        r = client.completions.create(
            model=model, prompt="x", temperature=1.0, n=2, max_tokens=600, extra_body=extra
        )
        for choice in r.choices:
            assert choice.finish_reason == "stop", (extra, choice.text)
            check(choice.text)


def test_streamed_regex(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        temperature=1.0,
        max_tokens=200,
        stream=True,
        extra_body={"guided_regex": REGEX},
    )
    text, reasons = "", []
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            reasons.append(c.finish_reason)
    assert re.fullmatch(REGEX, text), text
    assert reasons[-1] == "stop"


def test_text_format_is_unconstrained(client, model):
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, response_format={"type": "text"}, max_tokens=4
    )
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, None),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "bogus"}},
                }
            },
            None,
        ),
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
        ({"extra_body": {"guided_json": {"type": "bogus"}}}, "guided_json"),
        ({"extra_body": {"guided_regex": "([a-z"}}, "guided_regex"),
        ({"extra_body": {"guided_choice": []}}, "guided_choice"),
        ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "guided_choice"),
    ],
)
def test_bad_grammar_is_a_400_naming_the_field(client, model, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, **kwargs)
    body = err.value.body
    assert body["param"] == (param or "response_format"), body
    assert (param or "response_format") in body["message"]


def test_grammar_that_compiles_too_long_is_a_400(client, model, monkeypatch):
    from moska.server import structured_output

    monkeypatch.setattr(structured_output, "COMPILE_TIMEOUT_S", 1e-4)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model=model, prompt="x", max_tokens=4, extra_body={"guided_regex": "[a-z]{1,400}q"}
        )
    assert err.value.body["param"] == "guided_regex"
    assert err.value.body["code"] == "grammar_too_complex"
