"""Request and response bodies in the OpenAI shape (pydantic).

moska's own fields ride in the request body next to OpenAI's, as vLLM's extra parameters
do, so the official client sends them with `extra_body={"library": ..., "top_k_chunks": ...}`.
Unknown fields are ignored, as OpenAI-compatible servers do. moska's own response field
(`moska_routing` on a choice) is left out of the JSON unless the request asked for it.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
)

from moska.server.refused_fields import (
    RefusedChatFields,
    RefusedCompletionFields,
    RefusedSamplingFields,
)

LIBRARY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
LIBRARY_NAME_RE = re.compile(LIBRARY_NAME_PATTERN)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP = 16
MAX_LOGIT_BIAS = 1024  # entries of a request's logit_bias

LibraryName = Annotated[str, StringConstraints(pattern=LIBRARY_NAME_PATTERN)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class RoutingBody(BaseModel):
    """A library request's routing policy (moska.routing.RoutingPolicy); fields left out
    take the policy's defaults. Unknown fields are refused (a misspelt policy would
    otherwise route silently by the defaults)."""

    model_config = ConfigDict(extra="forbid")

    scorer: Literal["keymax", "two_stage", "mean", "bound"] | None = None
    dense_layers: int | None = Field(None, ge=0, le=1024, description="first layers read all")
    always_first: bool | None = Field(None, description="always read the first chunk")
    always_last: bool | None = Field(None, description="prefix mode: always the nearest chunk")
    mass_threshold: float | None = Field(
        None, gt=0.0, le=1.0, description="adaptive k: chunks until this estimated mass share"
    )
    page_size: int | None = Field(None, ge=1, le=2**20, description="key-max pages (tokens)")
    per_kv_head: bool | None = None


class RequestBody(BaseModel):
    """A request body: unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(RequestBody):
    include_usage: bool = False


class JsonSchemaFormat(RequestBody):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
    """OpenAI's `response_format`: text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingFields(RefusedSamplingFields, RequestBody):
    """Fields shared by /v1/completions and /v1/chat/completions. The vLLM fields moska does
    not implement come from RefusedSamplingFields: only their defaults are accepted (a 400
    names any other value; server/refused_fields.py)."""

    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = Field(None, max_length=MAX_STOP)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None,
        max_length=MAX_LOGIT_BIAS,
        description="token id (as a string) -> bias in [-100, 100] added to its logit",
    )
    # vLLM-style extras
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=1e6, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    # structured output (OpenAI's response_format and vLLM's guided_* extras; one at most)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = Field(
        None, description="JSON schema (object or JSON text) the output must match"
    )
    guided_regex: str | None = Field(None, description="regex the output must match")
    guided_choice: list[str] | None = Field(
        None, max_length=1024, description="the output is exactly one of these strings"
    )
    # moska extras
    library: (
        Annotated[str, StringConstraints(max_length=256)]
        | Annotated[list[Annotated[str, StringConstraints(max_length=256)]], Field(max_length=64)]
        | None
    ) = Field(
        None,
        description="shared KV library name, or a list of position-independent libraries "
        "read together (routed over the union of their chunks)",
    )
    top_k_chunks: int | None = Field(
        None, ge=1, le=2**31 - 1, description="library chunks routed per step"
    )
    report_routing: bool = Field(
        False,
        description="add each choice's routing report (`moska_routing`); needs `library`",
    )
    routing: RoutingBody | None = Field(
        None, description="routing policy for the library's chunks (default: the server's)"
    )


class CompletionRequest(RefusedCompletionFields, _SamplingFields):
    prompt: (
        Annotated[str, StringConstraints(max_length=10_000_000)]
        | Annotated[list[str], Field(min_length=1, max_length=64)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=64)
        ]
    )
    max_tokens: int | None = Field(
        16, ge=0, le=2**31 - 1, description="0 only with echo: score the prompt, generate nothing"
    )
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = Field(False, description="return the prompt (and, with logprobs, its logprobs)")
    best_of: int | None = Field(
        None, ge=1, le=128, description="candidates per prompt; the n most likely are returned"
    )
    suffix: str | None = Field(None, description="not supported: only null or empty")


class ContentPart(RequestBody):
    """A part of a message's content. Any type parses; only "text" is served (the chat
    route answers 400 naming any other type, e.g. image_url or input_audio)."""

    type: str = Field("text", max_length=64)
    text: str | None = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)  # an assistant's calls
    tool_call_id: str | None = None  # a tool message's answer to that call

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class FunctionDefinition(RequestBody):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(RequestBody):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(RefusedChatFields, _SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description="default auto with tools; required or a named function constrain "
        "the output to one call",
    )
    parallel_tool_calls: bool | None = Field(
        None, description="false: at most one tool call per choice (the first)"
    )


# ---------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        0, description="prompt tokens whose KV came from the prefix cache (not computed)"
    )
    library_tokens: int = Field(
        0,
        description="tokens of the shared library in front of the prompt (moska): not in "
        "prompt_tokens; each step attends to its routed chunks of them",
    )
    reused_tokens: int = Field(
        0,
        description="prompt tokens whose KV was reused from a similar earlier prompt "
        "(moska --semantic-reuse, SemShareKV; approximate), not computed past the first layers",
    )


class UsageInfo(BaseModel):
    prompt_tokens: int = Field(0, description="the request's own prompt tokens")
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class RoutedChunk(BaseModel):
    """One routed chunk, where it came from: the document holding its first token and its
    token span in the library (from the library's manifest)."""

    chunk: int = Field(description="chunk id")
    document: str | None = Field(
        description="name of the document the chunk starts in (a chunk of a prefix-mode "
        "library may run on into the next documents); null for a library whose manifest "
        "predates document spans"
    )
    start: int | None = Field(
        description="first token of the chunk in the library's token stream (pool row)"
    )
    end: int | None = Field(description="one past the chunk's last token, same numbering")


class RoutingReport(BaseModel):
    """Where a choice's library attention went at its last step, the one that sampled its
    last token (sent when the request has `report_routing`)."""

    chunks: list[RoutedChunk] = Field(
        description="library chunks routed to at the last step (last layer, KV head 0), "
        "ascending by chunk id"
    )
    coverage: float | None = Field(
        ge=0.0,
        le=1.0,
        description="share of the library's attention mass those chunks held at the last "
        "step, mean over the first, middle and last layers and the query heads; null if "
        "nothing was measured",
    )


class _Choice(BaseModel):
    """A choice whose `moska_routing` field is left out of the JSON when it is None."""

    # No return annotation on purpose: with one, pydantic would document the choice as a
    # bare object in the OpenAPI spec instead of by its fields.
    @model_serializer(mode="wrap")
    def _omit_absent_routing(self, handler: SerializerFunctionWrapHandler):
        data = handler(self)
        if isinstance(data, dict) and data.get("moska_routing") is None:
            data.pop("moska_routing", None)
        return data


class CompletionChoice(_Choice):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    moska_routing: RoutingReport | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Choice):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    moska_routing: RoutingReport | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "moska"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
