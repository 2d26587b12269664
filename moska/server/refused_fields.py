"""Request fields moska knows but does not implement: each only at its default, any other
value a 400 that names the field.

Unknown fields are ignored (protocol.py: as OpenAI-compatible servers do), so a field a
client relies on (vLLM's `guided_grammar`, OpenAI's legacy `functions`, `tools` sent to
/v1/completions) would otherwise be answered 200 and silently dropped. Declaring them here
puts them in the OpenAPI schema and lets `check_refused` turn a non-default value into a
400; the request models in protocol.py inherit these mixins.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from moska.server.errors import APIError

_Id = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Refused(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RefusedSamplingFields(_Refused):
    """vLLM's fields of both endpoints that moska does not implement."""

    use_beam_search: bool = Field(False, description="not supported: only false")
    length_penalty: float = Field(1.0, description="not supported: only 1.0")
    include_stop_str_in_output: bool = Field(False, description="not supported: only false")
    skip_special_tokens: bool = Field(True, description="not supported: only true")
    truncate_prompt_tokens: int | None = Field(None, description="not supported: only null")
    prompt_logprobs: int | None = Field(
        None, description="not supported: use echo with logprobs on /v1/completions"
    )
    allowed_token_ids: list[_Id] | None = Field(None, description="not supported")
    bad_words: list[str] | None = Field(None, description="not supported")
    guided_grammar: str | None = Field(
        None, description="not supported: use guided_regex, guided_json or response_format"
    )
    structured_outputs: dict[str, Any] | None = Field(
        None, description="not supported: use response_format or guided_*"
    )
    return_tokens_as_token_ids: bool = Field(False, description="not supported: only false")


class RefusedCompletionFields(_Refused):
    """Chat's tool fields sent to /v1/completions."""

    tools: list[dict[str, Any]] | None = Field(
        None, description="not supported here: tools are served on /v1/chat/completions"
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="not supported here: tools are served on /v1/chat/completions"
    )


class RefusedChatFields(_Refused):
    """OpenAI's and vLLM's chat fields that moska does not implement."""

    functions: list[dict[str, Any]] | None = Field(None, description="not supported: use tools")
    function_call: str | dict[str, Any] | None = Field(
        None, description="not supported: use tool_choice"
    )
    modalities: list[str] | None = Field(None, description='only ["text"]')
    audio: dict[str, Any] | None = Field(None, description="not supported")
    echo: bool = Field(False, description="not supported on chat: only false")
    add_generation_prompt: bool = Field(True, description="not supported: only true")
    continue_final_message: bool = Field(False, description="not supported: only false")
    chat_template: str | None = Field(
        None, description="not supported per request: start the server with --chat-template"
    )
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="not supported")


_CHAT_TOOLS = "is not supported on /v1/completions: send tools to /v1/chat/completions"

# field -> (the values accepted, why any other is refused)
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_beam_search": ((False,), "beam search is not supported"),
    "length_penalty": ((1.0,), "length_penalty is not supported (it applies to beam search)"),
    "include_stop_str_in_output": ((False,), "include_stop_str_in_output is not supported"),
    "skip_special_tokens": ((True,), "skip_special_tokens=false is not supported"),
    "truncate_prompt_tokens": ((None,), "truncate_prompt_tokens is not supported"),
    "prompt_logprobs": (
        (None,),
        (
            "prompt_logprobs is not supported as a field: use echo=true with logprobs on "
            "/v1/completions"
        ),
    ),
    "allowed_token_ids": ((None,), "allowed_token_ids is not supported: use logit_bias"),
    "bad_words": ((None,), "bad_words is not supported: use logit_bias"),
    "guided_grammar": (
        (None,),
        "guided_grammar is not supported: use guided_regex, guided_json or response_format",
    ),
    "structured_outputs": (
        (None,),
        (
            "structured_outputs is not supported: use response_format or guided_json, "
            "guided_regex, guided_choice"
        ),
    ),
    "return_tokens_as_token_ids": ((False,), "return_tokens_as_token_ids is not supported"),
    "tools": ((None,), f"tools {_CHAT_TOOLS}"),
    "tool_choice": ((None,), f"tool_choice {_CHAT_TOOLS}"),
    "functions": ((None,), "functions (deprecated by OpenAI) is not supported: use tools"),
    "function_call": (
        (None,),
        "function_call (deprecated by OpenAI) is not supported: use tool_choice",
    ),
    "modalities": ((None, ["text"]), "only text output is supported: modalities ['text']"),
    "audio": ((None,), "audio output is not supported"),
    "echo": ((False,), "echo is not supported on chat (it is on /v1/completions)"),
    "add_generation_prompt": ((True,), "add_generation_prompt=false is not supported"),
    "continue_final_message": ((False,), "continue_final_message is not supported"),
    "chat_template": (
        (None,),
        "a chat_template per request is not supported: start the server with --chat-template",
    ),
    "chat_template_kwargs": ((None,), "chat_template_kwargs is not supported"),
}


def check_refused(body: BaseModel) -> None:
    """400 naming the first field of `body` that one of its Refused* bases declares (one
    endpoint may implement a field another refuses: chat's `tools`, completions' `echo`) and
    that is not at its default."""
    mixins = (RefusedSamplingFields, RefusedCompletionFields, RefusedChatFields)
    for base in type(body).__mro__:
        if base not in mixins:
            continue
        for name in base.model_fields:
            accepted, why = REFUSED[name]
            if getattr(body, name) not in accepted:
                raise APIError(400, why, param=name, code="unsupported_field")
