"""Tools on /v1/chat/completions: messages and tools into the model's chat template, the
model's tool calls out of its text into OpenAI `tool_calls`.

Two tool-call formats, picked from the chat template: Qwen2.5's (Hermes) —
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, possibly after some
text — when the template mentions `<tool_call>`; otherwise Llama 3.1's JSON form —
`{"name": ..., "parameters": {...}}` as the whole reply (after an optional `<|python_tag|>`),
several separated by `;`. With `tool_choice` "required" or a named function the output is
constrained by a grammar to exactly one call in that format.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from typing import Any

from moska.engine.structured import Grammar, GrammarError
from moska.server.errors import APIError
from moska.server.protocol import ChatCompletionRequest, ChatMessage

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


class ToolFormat(enum.Enum):
    HERMES = "hermes"  # Qwen2.5: <tool_call>{"name", "arguments"}</tool_call>
    LLAMA_JSON = "llama3_json"  # Llama 3.1: {"name", "parameters"}

    @property
    def arguments_key(self) -> str:
        return "arguments" if self is ToolFormat.HERMES else "parameters"


def tool_format(chat_template: str | None) -> ToolFormat:
    return (
        ToolFormat.HERMES
        if chat_template and "<tool_call>" in chat_template
        else (ToolFormat.LLAMA_JSON)
    )


# ---------------------------------------------------------------- into the template


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as chat templates read them. A content part that is not text is a 400
    naming its type; an assistant's tool-call arguments become objects (templates such as
    Qwen2.5's write them with `tojson`)."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            for part in m.content:
                if part.type != "text":
                    raise APIError(
                        400,
                        f"content parts of type {part.type!r} are not supported (messages[{i}]):"
                        " this server reads text parts only",
                        param=f"messages[{i}].content",
                        code="unsupported_content_part",
                    )
                if part.text is None:
                    raise APIError(400, "a text part needs 'text'", param=f"messages[{i}].content")
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _args(c.function.arguments)},
                }
                for c in m.tool_calls
            ]
        out.append(msg)
    return out


def _args(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def template_tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools to render into the prompt (None: none, or tool_choice "none"). 400 naming
    tool_choice for a choice that does not fit the tools."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    if not isinstance(choice, str) and choice is not None:
        names = {t.function.name for t in body.tools}
        if choice.function.name not in names:
            raise APIError(
                400,
                f"tool_choice names {choice.function.name!r}, which is not one of the tools",
                param="tool_choice",
            )
    return [t.model_dump(exclude_none=True) for t in body.tools]


def tool_call_grammar(body: ChatCompletionRequest, fmt: ToolFormat) -> Grammar | None:
    """With tool_choice "required" or a named function: a grammar that admits exactly one
    call of the allowed tools in the model's format. None otherwise."""
    choice = body.tool_choice
    if not body.tools or choice in (None, "auto", "none"):
        return None
    if any(getattr(body, f, None) is not None for f in ("guided_json", "guided_regex")) or (
        body.response_format is not None and body.response_format.type != "text"
    ):
        raise APIError(
            400,
            "tool_choice required or a named function cannot be combined with "
            "response_format or guided_*",
            param="tool_choice",
        )
    tools = body.tools
    if not isinstance(choice, str):  # a named function
        tools = [t for t in tools if t.function.name == choice.function.name]
    key = fmt.arguments_key
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                key: t.function.parameters or {"type": "object"},
            },
            "required": ["name", key],
        }
        for t in tools
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    try:
        call = Grammar.json_schema(schema, "tools")
        if fmt is ToolFormat.LLAMA_JSON:
            return call
        return Grammar.regex("<tool_call>\\n" + call.to_regex() + "\\n</tool_call>", "tools")
    except GrammarError as exc:
        raise APIError(400, str(exc), param="tools", code="invalid_grammar") from exc


# ---------------------------------------------------------------- out of the text


def parse_tool_calls(text: str, fmt: ToolFormat) -> tuple[str | None, list[dict[str, Any]]]:
    """(content left over or None, OpenAI tool calls) of a reply; no calls when the text
    holds none in the model's format or one does not parse (the text is then content)."""
    calls = _hermes(text) if fmt is ToolFormat.HERMES else _llama(text)
    if not calls:
        return text, []
    if fmt is ToolFormat.HERMES:
        content = _HERMES_CALL.sub("", text).strip() or None
    else:
        content = None
    return content, [_openai_call(name, args) for name, args in calls]


def _hermes(text: str) -> list[tuple[str, Any]]:
    out = []
    for body in _HERMES_CALL.findall(text):
        call = _call(body, ("arguments", "parameters"))
        if call is None:
            return []
        out.append(call)
    return out


def _llama(text: str) -> list[tuple[str, Any]]:
    text = text.strip()
    if text.startswith(_PYTHON_TAG):
        text = text[len(_PYTHON_TAG) :].lstrip()
    if not text.startswith("{"):
        return []
    decoder, pos, out = json.JSONDecoder(), 0, []
    while pos < len(text):
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return []
        call = _call(obj, ("parameters", "arguments"))
        if call is None:
            return []
        out.append(call)
        pos = end
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
    return out


def _call(obj: Any, keys: tuple[str, ...]) -> tuple[str, Any] | None:
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError:
            return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = next((obj[k] for k in keys if k in obj), {})
    return obj["name"], args


def _openai_call(name: str, args: Any) -> dict[str, Any]:
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


class ToolReplies:
    """Turns a choice's text into its message, or its stream into deltas, and its finish
    reason. Streamed text goes out as content as soon as it cannot be part of a call: in
    Qwen2.5's format everything before a `<tool_call>` (a possible start of one is held
    back), in Llama 3.1's a reply that does not open with `{`; a call is held until the
    choice ends and then sent whole as one `tool_calls` delta. `single` (the request's
    `parallel_tool_calls: false`): a choice keeps only its first call."""

    def __init__(self, fmt: ToolFormat, single: bool = False) -> None:
        self.fmt = fmt
        self.single = single
        self._held: dict[int, str] = {}  # text not sent yet
        self._calling: set[int] = set()  # choices whose held text holds a call

    def _parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        content, calls = parse_tool_calls(text, self.fmt)
        return content, calls[:1] if self.single else calls

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        content, calls = self._parse(text)
        if not calls:
            return {"role": "assistant", "content": content}, finish_reason
        msg = {"role": "assistant", "content": content, "tool_calls": calls}
        return msg, "tool_calls"

    def feed(self, index: int, new_text: str) -> str:
        """The part of the choice's text that can be sent as content now."""
        held = self._held.get(index, "") + new_text
        if index in self._calling:
            self._held[index] = held
            return ""
        if self.fmt is ToolFormat.LLAMA_JSON:
            start = held.lstrip()
            if not start:  # undecided yet
                self._held[index] = held
                return ""
            if start.startswith(("{", _PYTHON_TAG)):
                self._calling.add(index)
                self._held[index] = held
                return ""
            self._held[index] = ""
            return held
        tag = "<tool_call>"
        at = held.find(tag)
        if at >= 0:
            self._calling.add(index)
        else:  # hold back a suffix that may grow into the tag
            at = next((k for k in range(max(0, len(held) - len(tag) + 1), len(held))
                       if tag.startswith(held[k:])), len(held))  # fmt: skip
        self._held[index] = held[at:]
        return held[:at]

    def final_delta(self, index: int, new_text: str, finish_reason: str) -> tuple[dict, str]:
        """The choice's last delta (its last text and what was held) and finish reason."""
        sendable = self.feed(index, new_text)
        held = self._held.pop(index, "")
        calling = index in self._calling
        self._calling.discard(index)
        content, calls = self._parse(held) if calling else (held, [])
        content = sendable + (content or "")
        delta: dict[str, Any] = {"content": content} if content else {}
        if not calls:
            return delta, finish_reason
        delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
        return delta, "tool_calls"
