"""vLLM's utility routes: POST /tokenize, POST /detokenize, GET /version.

Bodies are vLLM's, so clients written for vLLM (token counting before a request, prompt
budgeting in agents) work unchanged. Tokenizing and chat templating run on the server's
tokenizer threads (`state.tokenizers`, as for /v1/chat/completions): a large body never
stalls the event loop, and its size is bounded there (a 400 naming the field, or a 429
when too much text waits to be encoded), by the schema below and by the body limit.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from moska import __version__
from moska.server.errors import APIError
from moska.server.generate import check_model
from moska.server.protocol import ChatMessage, ChatTool, ErrorResponse, TokenId
from moska.server.state import ServerState, StateDep
from moska.server.tools import template_messages

router = APIRouter(tags=["utilities"])

MAX_PROMPT_CHARS = 10_000_000  # the same bound as a /v1/completions prompt
MAX_DETOKENIZE_TOKENS = 1 << 20
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413)
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="the served model's id (checked when given)")


class TokenizeRequest(_Body):
    """vLLM's two bodies in one: `prompt` (as /v1/completions) or `messages` (as
    /v1/chat/completions, rendered with the chat template), never both."""

    prompt: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)] | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=4096)
    add_generation_prompt: bool = Field(
        True,
        description="with messages: end with the assistant's header, as a chat completion does",
    )
    add_special_tokens: bool | None = Field(
        None,
        description="add BOS; default: yes for a prompt, no for messages (the chat template "
        "writes its own)",
    )
    tools: list[ChatTool] | None = Field(
        None, max_length=128, description="with messages: rendered as a chat completion does"
    )

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' or 'messages'")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Body):
    tokens: list[TokenId] = Field(max_length=MAX_DETOKENIZE_TOKENS)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


def _tokenizer(state: ServerState, model: str | None) -> Any:
    if model is not None:
        check_model(state, model)
    tokenizer = state.engine.tokenizer
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer (no tokenizer.json)", param="model")
    return tokenizer


def _chat_ids(tokenizer: Any, body: TokenizeRequest, messages: list[dict]) -> list[int]:
    extra = {"tools": [t.model_dump(exclude_none=True) for t in body.tools]} if body.tools else {}
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt, **extra
        )
    except Exception as exc:  # a template's raise_exception, or no template
        raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from exc
    return tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeRequest, state: StateDep) -> TokenizeResponse:
    """Token ids of a prompt, or of chat messages rendered with the chat template (as
    /v1/chat/completions renders them)."""
    tokenizer = _tokenizer(state, body.model)
    if body.messages is not None:
        messages = template_messages(body.messages)  # as chat: 400 for a non-text part
        size = sum(len(m["content"]) for m in messages)
        tokens = await state.tokenizers.run(
            lambda: _chat_ids(tokenizer, body, messages), size, "messages"
        )
    else:
        prompt = body.prompt or ""
        special = body.add_special_tokens is not False
        tokens = await state.tokenizers.run(
            lambda: tokenizer.encode(prompt, add_special_tokens=special), len(prompt), "prompt"
        )
    return TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, state: StateDep) -> DetokenizeResponse:
    """The text of token ids (special tokens included, as vLLM's /detokenize)."""
    tokenizer = _tokenizer(state, body.model)
    vocab = tokenizer.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise APIError(
            400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens"
        )
    ids = body.tokens
    text = await state.tokenizers.run(lambda: tokenizer.decode(ids, False), len(ids), "tokens")
    return DetokenizeResponse(prompt=text)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)
