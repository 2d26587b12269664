"""Tools on chat: rendered through the checkpoint's chat template, calls parsed from the
Qwen2.5 (<tool_call>) and Llama 3.1 (JSON) formats, tool_choice "required" / named
constrained by a grammar; non-text content parts are a 400 naming the part type."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from moska.model.default import default_model_dir
from moska.server.tools import ToolFormat, ToolReplies, parse_tool_calls, tool_format

pytestmark = pytest.mark.server

# Small templates carrying each format, in the shape of Qwen2.5's and Llama 3.1's.
QWEN_TEMPLATE = (
    "{%- if tools %}<|system|># Tools\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}"
    "{%- endfor %}\n</tools>\nFor each call return <tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>{{ eos_token }}'
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>"
    "{%- for tc in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}'
    "\n</tool_call>{%- endfor %}{{ eos_token }}"
    "{%- elif m.role == 'tool' %}<|user|><tool_response>\n{{ m.content }}\n</tool_response>"
    "{{ eos_token }}"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)
LLAMA_TEMPLATE = (
    "{{ bos_token }}{%- if tools %}<|system|>Environment: ipython\nRespond with a JSON for a "
    'function call: {"name": function name, "parameters": dictionary of argument name and '
    "its value}.{%- for t in tools %}\n{{ t | tojson(indent=4) }}{%- endfor %}{{ eos_token }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>"
    "{%- for tc in m.tool_calls %}"
    '{"name": "{{ tc.function.name }}", "parameters": {{ tc.function.arguments | tojson }}}'
    "{%- endfor %}{{ eos_token }}"
    "{%- elif m.role == 'tool' %}<|user|>{{ m.content | tojson }}{{ eos_token }}"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)
TEMPLATES = {"qwen": QWEN_TEMPLATE, "llama": LLAMA_TEMPLATE}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["C", "F"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def check_call(call) -> None:
    """A call of one of TOOLS whose arguments match its parameters (checked by hand)."""
    args = json.loads(call.function.arguments)
    assert call.type == "function" and call.id.startswith("call_")
    if call.function.name == "get_weather":
        assert set(args) == {"city", "unit"}
        assert isinstance(args["city"], str) and len(args["city"]) <= 12
        assert args["unit"] in ("C", "F")
    else:
        assert call.function.name == "add" and set(args) == {"a", "b"}
        assert all(isinstance(v, int) and not isinstance(v, bool) for v in args.values())


# ---------------------------------------------------------------- parsing, no server


def test_format_from_template():
    assert tool_format(QWEN_TEMPLATE) is ToolFormat.HERMES
    assert tool_format(LLAMA_TEMPLATE) is ToolFormat.LLAMA_JSON
    assert tool_format(None) is ToolFormat.LLAMA_JSON


def test_parse_hermes():
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        '</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    )
    content, calls = parse_tool_calls(text, ToolFormat.HERMES)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert len({c["id"] for c in calls}) == 2
    # unterminated last call (max_tokens hit after the JSON) still parses
    _, calls = parse_tool_calls('<tool_call>{"name": "add", "arguments": {}}', ToolFormat.HERMES)
    assert calls[0]["function"]["name"] == "add"
    for plain in ("just text", '<tool_call>{"name": broken</tool_call>'):
        assert parse_tool_calls(plain, ToolFormat.HERMES) == (plain, [])


def test_parse_llama_json():
    content, calls = parse_tool_calls(
        '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', ToolFormat.LLAMA_JSON
    )
    assert content is None and calls[0]["function"]["name"] == "add"
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    _, calls = parse_tool_calls(
        '{"name": "add", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "x"}}',
        ToolFormat.LLAMA_JSON,
    )
    assert [c["function"]["name"] for c in calls] == ["add", "get_weather"]
    for plain in ("The answer is 3", '{"no_name": 1}', '{"name": "add", "parameters": {'):
        assert parse_tool_calls(plain, ToolFormat.LLAMA_JSON) == (plain, [])


def test_stream_sends_content_at_once_and_calls_whole():
    replies = ToolReplies(ToolFormat.HERMES)
    pieces = ["Sure", ", checking <to", 'ol_call>\n{"name": "add", ', '"arguments": {"a": 1}}']
    sent = [replies.feed(0, p) for p in pieces]
    assert sent == ["Sure", ", checking ", "", ""]  # "<to" held: it may open a call
    delta, reason = replies.final_delta(0, "", "stop")
    assert reason == "tool_calls" and "content" not in delta
    assert delta["tool_calls"][0]["index"] == 0
    assert delta["tool_calls"][0]["function"]["name"] == "add"
    # a held "<" that turns out not to be a tag goes out with the next piece
    assert [replies.feed(1, p) for p in ["a <", "b> c"]] == ["a ", "<b> c"]
    assert replies.final_delta(1, " end", "length") == ({"content": " end"}, "length")

    replies = ToolReplies(ToolFormat.LLAMA_JSON)
    assert [replies.feed(0, p) for p in [" ", "Hi", " there"]] == ["", " Hi", " there"]
    assert [replies.feed(1, p) for p in [" {", '"name": "add", "parameters": {}}']] == ["", ""]
    delta, reason = replies.final_delta(1, "", "stop")
    assert reason == "tool_calls" and delta["tool_calls"][0]["function"]["name"] == "add"
    # JSON that is not a call comes out as content at the end
    replies.feed(2, '{"x": ')
    assert replies.final_delta(2, "1}", "stop") == ({"content": '{"x": 1}'}, "stop")


# ---------------------------------------------------------------- real servers


@pytest.fixture(scope="module", params=["qwen", "llama"])
def tool_server(request, tmp_path_factory):
    """(client, model id, format) of a server on a tiny checkpoint with that template."""
    from moska.engine.llm_engine import LLMEngine
    from moska.server.app import create_app
    from moska.server.background import background_server
    from moska.server.settings import ServerSettings

    path = tmp_path_factory.mktemp(f"tiny-{request.param}") / "model"
    shutil.copytree(default_model_dir(), path)
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = TEMPLATES[request.param]
    cfg_file.write_text(json.dumps(cfg))
    engine = LLMEngine.from_model(str(path), device="cpu", max_model_len=4096, num_kv_blocks=1024)
    app = create_app(engine, ServerSettings())
    with background_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        yield client, client.models.list().data[0].id, request.param


def test_tools_are_rendered_through_the_template(tool_server):
    client, model, _ = tool_server
    kw = {"model": model, "messages": MESSAGES, "max_tokens": 1, "temperature": 0}
    plain = client.chat.completions.create(**kw).usage.prompt_tokens
    with_tools = client.chat.completions.create(**kw, tools=TOOLS).usage.prompt_tokens
    with_none = client.chat.completions.create(**kw, tools=TOOLS, tool_choice="none")
    # the tools' JSON is in the prompt (byte tokens: at least as long as the names)
    assert with_tools > plain + len("get_weather") + len("Add two integers")
    assert with_none.usage.prompt_tokens == plain


def test_required_tool_choice_gives_valid_calls(tool_server):
    client, model, _ = tool_server
    r = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        n=2,
        seed=5,
        max_tokens=400,
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        assert len(choice.message.tool_calls) == 1 and not choice.message.content
        check_call(choice.message.tool_calls[0])


def test_named_tool_choice_streams_the_call(tool_server):
    client, model, _ = tool_server
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=1.0,
        max_tokens=400,
        stream=True,
    )
    calls, reasons, content = [], [], ""
    for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            content += c.delta.content or ""
            reasons.append(c.finish_reason)
    assert reasons[-1] == "tool_calls" and not content
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "add"
    check_call(calls[0])


def test_tool_history_renders(tool_server):
    """An assistant's call and the tool's answer go back through the template."""
    client, model, _ = tool_server
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=2)
    short = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, max_tokens=2
    )
    assert r.usage.prompt_tokens > short.usage.prompt_tokens + len('{"a": 1, "b": 2}')


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required"},
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
    ],
)
def test_bad_tool_choice_is_a_400(tool_server, kwargs):
    client, model, _ = tool_server
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, **kwargs)
    assert err.value.body["param"] == "tool_choice"


# ---------------------------------------------------------------- content parts


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "f"}},
    ],
)
def test_non_text_content_part_is_a_400_naming_its_type(client, model, part):
    content = [{"type": "text", "text": "What is this?"}, part]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=2
        )
    assert part["type"] in err.value.body["message"]
    assert err.value.body["param"] == "messages[0].content"


def test_text_parts_still_work(client, model):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": parts}], max_tokens=3, temperature=0
    )
    joined = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=3,
        temperature=0,
    )  # fmt: skip
    assert r.choices[0].message.content == joined.choices[0].message.content
    assert r.usage.prompt_tokens == joined.usage.prompt_tokens


def test_auto_stream_matches_the_whole_reply(tool_server):
    """With tools and no call in the reply, streamed content adds up to the whole reply."""
    client, model, _ = tool_server
    kw = {"model": model, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 24}
    whole = client.chat.completions.create(**kw, temperature=0).choices[0]
    text = ""
    for chunk in client.chat.completions.create(**kw, temperature=0, stream=True):
        for c in chunk.choices:
            text += c.delta.content or ""
            assert not c.delta.tool_calls
    assert whole.message.tool_calls is None and text == whole.message.content
