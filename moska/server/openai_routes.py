"""OpenAI routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from moska.engine.outputs import RequestOutput
from moska.server.completion_echo import Echo, make_echo, pick_best
from moska.server.completion_echo import choice as choice_body
from moska.server.errors import APIError, error_body
from moska.server.generate import Generation, check_model, submit
from moska.server.logprobs_format import chat_logprobs, completion_logprobs
from moska.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from moska.server.sampling_fields import choices_per_prompt
from moska.server.state import ServerState, StateDep
from moska.server.streaming import (
    SSE_DONE,
    ClientDisconnected,
    SSEResponse,
    sse,
    unless_disconnected,
)
from moska.server.tools import (
    ToolReplies,
    template_messages,
    template_tools,
    tool_call_grammar,
    tool_format,
)

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}
_STREAM = {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream"}


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(state: StateDep) -> ModelList:
    return ModelList(data=[ModelCard(id=state.model_name, max_model_len=state.max_model_len)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
async def retrieve_model(model_id: str, state: StateDep) -> ModelCard:
    """The served model's card; 404 `model_not_found` for any other id."""
    check_model(state, model_id)
    return ModelCard(id=state.model_name, max_model_len=state.max_model_len)


@router.post(
    "/v1/completions", response_model=CompletionResponse, responses={**_ERRORS, 200: _STREAM}
)
async def create_completion(body: CompletionRequest, request: Request, state: StateDep):
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts: list = [prompt]
    else:
        prompts = list(prompt)
    candidates = choices_per_prompt(body)
    # best_of ranks candidates by their cumulative logprob: the engine reports it always
    engine_lp = 0 if body.logprobs is None and candidates > body.n else body.logprobs
    gen = await submit(state, body, prompts, "cmpl", body.max_tokens, engine_lp)
    echo = await make_echo(state, body, prompts)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(state, gen, _completion_chunks(state, gen, include_usage, echo))
    last = await _collect(request, state, gen)
    choices: list[Any] = []  # dicts, validated into the response model
    completion_tokens = 0
    if echo is None or not echo.score_only:
        completion_tokens = sum(len(o.outputs[0].token_ids) for o in last.values())
    if candidates > body.n:
        last = pick_best(last, candidates, body.n)
    for idx in sorted(last):
        text, lp, _ = choice_body(state, idx, last[idx], echo, body.logprobs is not None)
        choices.append(
            {
                "index": idx,
                "text": text,
                "logprobs": lp,
                "finish_reason": last[idx].outputs[0].finish_reason,
                "moska_routing": gen.routing(last[idx]),
            }
        )
    return CompletionResponse(
        id=gen.request_id,
        created=gen.created,
        model=gen.model,
        choices=choices,
        usage=gen.usage(completion_tokens),
    )


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**_ERRORS, 200: _STREAM},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: StateDep):
    messages = template_messages(body.messages)  # 400 for a non-text content part
    tools = template_tools(body)  # None without tools or with tool_choice "none"
    tokenizer = state.engine.tokenizer
    fmt = tool_format(getattr(tokenizer, "chat_template", None))
    replies = ToolReplies(fmt, single=body.parallel_tool_calls is False) if tools else None
    extra = {"tools": tools} if tools else {}

    def render() -> list[int]:  # on the tokenizer pool: a long message must not block the loop
        if tokenizer is None:
            msg = "this model has no tokenizer (no tokenizer.json) and so no chat template"
            raise APIError(400, msg, param="messages")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
        except Exception as exc:
            msg = f"could not apply the chat template: {exc}"
            raise APIError(400, msg, param="messages") from exc
        if not isinstance(text, str):  # some tokenizers return ids
            return list(text)
        # The template writes its own special tokens (BOS): send ids so none is added twice.
        try:
            return tokenizer.encode(text, add_special_tokens=False)
        except Exception as exc:
            msg = f"could not tokenize the messages: {exc}"
            raise APIError(400, msg, param="messages") from exc

    num_chars = sum(len(m["content"] or "") for m in messages)
    prompt = await state.tokenizers.run(render, num_chars, "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    grammar = tool_call_grammar(body, fmt)
    gen = await submit(state, body, [prompt], "chatcmpl", max_tokens, logprobs, grammar)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        top_n = body.top_logprobs or 0
        return _sse(state, gen, _chat_chunks(state, gen, include_usage, top_n, replies))
    last = await _collect(request, state, gen)
    choices: list[Any] = []  # dicts, validated into the response model
    completion_tokens = 0
    for idx in sorted(last):
        out = last[idx].outputs[0]
        completion_tokens += len(out.token_ids)
        lp = None
        if logprobs is not None:
            lp = chat_logprobs(state, out.logprobs or [], body.top_logprobs or 0)
        message, reason = {"role": "assistant", "content": out.text}, out.finish_reason
        if replies is not None:
            message, reason = replies.message(out.text, reason)
        choices.append(
            {
                "index": idx,
                "message": message,
                "logprobs": lp,
                "finish_reason": reason,
                "moska_routing": gen.routing(last[idx]),
            }
        )
    return ChatCompletionResponse(
        id=gen.request_id,
        created=gen.created,
        model=gen.model,
        choices=choices,
        usage=gen.usage(completion_tokens),
    )


async def _collect(request: Request, state: ServerState, gen: Generation) -> dict:
    try:
        return await unless_disconnected(request, gen.final_outputs())
    except ClientDisconnected:
        state.async_engine.abort(gen.request_ids)
        return {}
    except BaseException:
        state.async_engine.abort(gen.request_ids)
        raise


def _sse(state: ServerState, gen: Generation, chunks: AsyncIterator[bytes]) -> SSEResponse:
    ids = gen.request_ids
    return SSEResponse(chunks, on_close=lambda: state.async_engine.abort(ids))


async def _guarded(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Ends every stream with [DONE]; an engine failure mid-stream becomes an error event."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as exc:
        yield sse(error_body(exc.status, exc.message, code=exc.code))
    yield SSE_DONE


def _with_routing(gen: Generation, choice: dict, out: RequestOutput) -> dict:
    """A stream choice, plus `moska_routing` on a choice's final chunk when asked for."""
    report = gen.routing(out)
    return choice if report is None else {**choice, "moska_routing": report}


def _completion_chunks(
    state: ServerState, gen: Generation, include_usage: bool, echo: Echo | None = None
) -> AsyncIterator[bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        offsets: dict[int, int] = {}
        echoed: set[int] = set()
        sent_lp: dict[int, int] = {}
        completion_tokens = 0
        base = {
            "id": gen.request_id,
            "object": "text_completion",
            "created": gen.created,
            "model": gen.model,
        }
        async for idx, out in gen.outputs():
            reason = out.outputs[0].finish_reason if out.finished else None
            if echo is not None and idx not in echoed:  # the prompt first, in its own chunk
                echoed.add(idx)
                text = echo.prompt_text(idx)
                offsets[idx] = len(text)
                lp = echo.prompt_logprobs(state, out)
                choice = {"index": idx, "text": text, "logprobs": lp, "finish_reason": None}
                yield sse({**base, "choices": [choice], "usage": None})
            if echo is not None and echo.score_only:  # max_tokens 0: only the finish
                if reason is not None:
                    choice = {"index": idx, "text": "", "logprobs": None, "finish_reason": reason}
                    yield sse({**base, "choices": [_with_routing(gen, choice, out)], "usage": None})
                continue
            completion_tokens += len(out.new_token_ids)
            lp = None
            if gen.params.logprobs is not None:
                all_lp = out.outputs[0].logprobs or []
                new = all_lp[sent_lp.get(idx, 0) :]
                sent_lp[idx] = len(all_lp)
                lp = completion_logprobs(state, new, offsets.get(idx, 0))
            if not out.new_text and reason is None and not (lp and lp["tokens"]):
                continue
            offsets[idx] = offsets.get(idx, 0) + len(out.new_text)
            choice = {"index": idx, "text": out.new_text, "logprobs": lp, "finish_reason": reason}
            yield sse({**base, "choices": [_with_routing(gen, choice, out)], "usage": None})
        if include_usage:
            usage = gen.usage(completion_tokens).model_dump()
            yield sse({**base, "choices": [], "usage": usage})

    return _guarded(chunks())


def _chat_chunks(
    state: ServerState,
    gen: Generation,
    include_usage: bool,
    top_n: int,
    replies: ToolReplies | None = None,
) -> AsyncIterator[bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        base = {
            "id": gen.request_id,
            "object": "chat.completion.chunk",
            "created": gen.created,
            "model": gen.model,
        }
        for idx in range(len(gen.streams)):
            choice = {
                "index": idx,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            yield sse({**base, "choices": [choice], "usage": None})
        sent_lp: dict[int, int] = {}
        completion_tokens = 0
        async for idx, out in gen.outputs():
            completion_tokens += len(out.new_token_ids)
            reason = out.outputs[0].finish_reason if out.finished else None
            lp = None
            if gen.params.logprobs is not None:
                all_lp = out.outputs[0].logprobs or []
                new = all_lp[sent_lp.get(idx, 0) :]
                sent_lp[idx] = len(all_lp)
                lp = chat_logprobs(state, new, top_n)
            new_text = out.new_text
            if replies is not None and reason is None:  # a call's text is held to the end
                new_text = replies.feed(idx, new_text)
            if not new_text and reason is None and not (lp and lp["content"]):
                continue
            delta = {"content": new_text} if new_text else {}
            if replies is not None and reason is not None:
                delta, reason = replies.final_delta(idx, new_text, reason)
            choice = {"index": idx, "delta": delta, "logprobs": lp, "finish_reason": reason}
            yield sse({**base, "choices": [_with_routing(gen, choice, out)], "usage": None})
        if include_usage:
            usage = gen.usage(completion_tokens).model_dump()
            yield sse({**base, "choices": [], "usage": usage})

    return _guarded(chunks())
