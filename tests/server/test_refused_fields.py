"""Request fields moska does not implement are a 400 naming them, never a 200 that drops
them (issue 15, point 6): vLLM's and OpenAI's fields on both endpoints, chat's tool fields
sent to /v1/completions; `parallel_tool_calls: false` keeps one call; a chat's context
errors name `messages`; /tokenize renders messages (parts, tools) as chat does."""

from __future__ import annotations

import httpx
import openai
import pytest

from moska.server.refused_fields import REFUSED
from moska.server.tools import ToolFormat, ToolReplies

pytestmark = pytest.mark.server

HI = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

BOTH = [
    ({"guided_grammar": 'root ::= "a"'}, "guided_grammar"),
    ({"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
    ({"return_tokens_as_token_ids": True}, "return_tokens_as_token_ids"),
    ({"allowed_token_ids": [1, 2]}, "allowed_token_ids"),
]
COMPLETION = [({"tools": [TOOL]}, "tools"), ({"tool_choice": "auto"}, "tool_choice")]
CHAT = [
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"echo": True}, "echo"),
    ({"add_generation_prompt": False}, "add_generation_prompt"),
    ({"continue_final_message": True}, "continue_final_message"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
]


@pytest.fixture(scope="module")
def http(real_server):
    url, _ = real_server
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


@pytest.mark.parametrize("extra, param", BOTH + COMPLETION)
def test_completion_field_is_refused_by_name(client, model, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="Hi", max_tokens=1, extra_body=extra)
    assert e.value.body["param"] == param and e.value.body["code"] == "unsupported_field"
    assert e.value.body["message"] == REFUSED[param][1]


@pytest.mark.parametrize("extra, param", BOTH + CHAT)
def test_chat_field_is_refused_by_name(client, model, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=HI, max_tokens=1, extra_body=extra)
    assert e.value.body["param"] == param and e.value.body["code"] == "unsupported_field"


def test_defaults_of_refused_fields_are_accepted(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=HI,
        max_tokens=1,
        parallel_tool_calls=False,
        extra_body={"modalities": ["text"], "add_generation_prompt": True, "echo": False},
    )
    assert r.choices[0].finish_reason == "length"


def test_parallel_tool_calls_false_keeps_the_first_call():
    two = (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b"}</tool_call>'
    )
    msg, _ = ToolReplies(ToolFormat.HERMES).message(two, "stop")
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["a", "b"]
    msg, reason = ToolReplies(ToolFormat.HERMES, single=True).message(two, "stop")
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["a"] and reason == "tool_calls"
    single = ToolReplies(ToolFormat.LLAMA_JSON, single=True)
    assert single.feed(0, '{"name": "a", "parameters": {}}; ') == ""
    delta, reason = single.final_delta(0, '{"name": "b", "parameters": {}}', "stop")
    assert [c["function"]["name"] for c in delta["tool_calls"]] == ["a"]


def test_chat_context_errors_name_the_chat_fields(client, model, real_engine):
    long = [{"role": "user", "content": "x" * (real_engine.max_model_len + 10)}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=long, max_tokens=1)
    assert e.value.body["param"] == "messages"
    over = real_engine.max_model_len
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=HI, max_completion_tokens=over)
    assert e.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=HI, max_tokens=over)
    assert e.value.body["param"] == "max_tokens"


def test_tokenize_renders_messages_as_chat_does(http, model, real_engine):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, image]}]
    r = http.post("/tokenize", json={"model": model, "messages": parts})
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages[0].content"
    tok = real_engine.tokenizer
    original = tok.chat_template
    tok.set_chat_template(
        "{% if tools %}[{% for t in tools %}{{ t.function.name }};{% endfor %}]{% endif %}"
        "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    try:
        body = {"model": model, "messages": HI, "tools": [TOOL]}
        got = http.post("/tokenize", json=body).json()["tokens"]
        want = tok.encode(tok.apply_chat_template(HI, tools=[TOOL]), add_special_tokens=False)
        assert got == want and tok.decode(got) == "[f;]Hi"
    finally:
        tok.set_chat_template(original)
