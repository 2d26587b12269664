"""POST /v1/completions and /v1/chat/completions: validate, admit, submit, answer.

One HTTP request becomes `len(prompts) * n` engine requests with ids `{id}-{k}`, k the
choice index; with a seed, choice j of a prompt samples with seed + j. With
`report_routing` (and a library), each choice's last output carries its routing report
(server/routing_answer.py); the request's library is checked and looked up by
server/library_lookup.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from moska.engine.outputs import RequestOutput
from moska.engine.sampling_params import SamplingParams, SamplingParamsError
from moska.engine.structured import Grammar
from moska.library.positions import drop_template_bos, request_wants_bos
from moska.server import sampling_fields, structured_output
from moska.server.async_engine import AsyncEngine
from moska.server.bookings import current_key
from moska.server.errors import APIError, from_engine_error
from moska.server.library_lookup import check_library, lookup_library
from moska.server.load_shedding import ARRIVAL, elapsed_since_arrival
from moska.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    PromptTokensDetails,
    UsageInfo,
)
from moska.server.queue_replay import request_cost
from moska.server.request_stream import EngineDeadError, RequestStream
from moska.server.routing_answer import check_report_routing, routing_report
from moska.server.state import ServerState
from moska.server.structured_output import grammar_of


@dataclass
class Generation:
    """A validated, admitted and submitted HTTP request."""

    request_id: str
    created: int
    model: str
    streams: list[RequestStream]
    queue: asyncio.Queue
    choice_of: dict[str, int]
    params: SamplingParams  # of choice 0; logprobs etc. are the same for all
    num_prompts: int
    prompt_tokens: dict[int, int] = field(default_factory=dict)  # prompt index -> tokens
    cached_tokens: dict[int, int] = field(default_factory=dict)  # prompt index -> cache hits
    library_tokens: int = 0  # of the library in front of every prompt
    reused_tokens: dict[int, int] = field(default_factory=dict)  # prompt index -> SemShareKV
    n: int = 1
    report_routing: bool = False
    # told, per choice, how long its first token waited between the engine and here
    # (admission's margin, server/ttft_margin.py: the client's TTFT ends here, not there)
    delivered: Callable[[float], None] | None = None

    def routing(self, out: RequestOutput) -> dict | None:
        """The `moska_routing` of a choice's final output, or None when not asked for."""
        return routing_report(out) if self.report_routing and out.finished else None

    @property
    def request_ids(self) -> list[str]:
        return [s.request_id for s in self.streams]

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) until every choice has finished."""
        remaining = set(self.choice_of)
        first = {s.request_id: s for s in self.streams}  # choices without a first token here
        while remaining:
            item = await self.queue.get()
            if isinstance(item, EngineDeadError):
                raise APIError(503, str(item), code="shutting_down") from item
            if isinstance(item, BaseException):
                raise APIError(500, str(item), code="engine_error") from item
            stream = first.get(item.request_id)
            if stream is not None and stream.first_token_time is not None:
                del first[item.request_id]
                if self.delivered is not None:
                    self.delivered(time.monotonic() - stream.first_token_time)
            idx = self.choice_of[item.request_id]
            self.prompt_tokens.setdefault(idx // self.n, len(item.prompt_token_ids))
            if item.finished or item.num_cached_tokens:
                self.cached_tokens.setdefault(idx // self.n, item.num_cached_tokens)
            if item.finished or item.num_reused_tokens:
                self.reused_tokens.setdefault(idx // self.n, item.num_reused_tokens)
            if item.library is not None:
                self.library_tokens = int(item.library.num_tokens)
            if item.finished:
                remaining.discard(item.request_id)
            yield idx, item

    async def final_outputs(self) -> dict[int, RequestOutput]:
        last: dict[int, RequestOutput] = {}
        async for idx, out in self.outputs():
            last[idx] = out
        return last

    def usage(self, completion_tokens: int) -> UsageInfo:
        prompt = sum(self.prompt_tokens.values())
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion_tokens,
            total_tokens=prompt + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=sum(self.cached_tokens.values()),
                library_tokens=self.library_tokens * len(self.prompt_tokens),
                reused_tokens=sum(self.reused_tokens.values()),
            ),
        )


def check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{state.model_name}'",
            param="model",
            code="model_not_found",
        )


async def tokenize(state: ServerState, prompt: str | list[int], special: bool = True) -> list[int]:
    """A prompt's token ids, as the engine would encode it (`special`: whether it adds
    special tokens such as BOS); checks token ids against the vocabulary. Text is encoded
    on the tokenizer pool, off the event loop and the engine thread, within its bounds
    (400 / 429); the engine then receives the ids."""
    tok = state.engine.tokenizer
    if isinstance(prompt, list):
        vocab = getattr(tok, "vocab_size", None)
        if vocab is not None and prompt and max(prompt) >= vocab:
            raise APIError(
                400, f"token ids must be below the vocabulary size {vocab}", param="prompt"
            )
        return prompt
    if tok is None:
        msg = "this model has no tokenizer (no tokenizer.json): send the prompt as token ids"
        raise APIError(400, msg, param="prompt")
    try:
        ids = await state.tokenizers.run(lambda: tok.encode(prompt, special), len(prompt), "prompt")
    except APIError:
        raise
    except Exception as exc:
        raise APIError(400, f"could not tokenize the prompt: {exc}", param="prompt") from exc
    return list(ids)


def resolve_max_tokens(
    state: ServerState,
    num_prompt: int,
    max_tokens: int | None,
    library_tokens: int = 0,
    *,
    params: tuple[str, str] = ("prompt", "max_tokens"),
) -> int:
    """max_tokens as given (checked against the context), or when absent what is left of
    the context after the library and the prompt, capped by `max_tokens_default`. `params`:
    the request's names of the prompt and of max_tokens, which a 400 names."""
    prompt_param, max_param = params
    limit = state.max_model_len
    used = library_tokens + num_prompt
    lib = f"the library's {library_tokens} tokens + " if library_tokens else ""
    if num_prompt == 0:
        raise APIError(400, "the prompt is empty", param=prompt_param, code="empty_prompt")
    if used >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens; {lib}the prompt's "
            f"{num_prompt} tokens leave no room for a completion. Shorten the prompt.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        cap = state.settings.max_tokens_default
        return limit - used if cap is None else min(cap, limit - used)
    if used + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens; you requested "
            f"{used + max_tokens} ({lib}{num_prompt} in the prompt, {max_tokens} for the "
            f"completion). Reduce the prompt or {max_param}.",
            param=max_param,
            code="context_length_exceeded",
        )
    return max_tokens


def sampling_params(
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    logprobs: int | None,
    j: int,
    bias: dict[int, float] | None = None,
) -> SamplingParams:
    """Choice j's engine settings. With echo, the prompt's logprobs are asked for too (as
    many alternatives as `logprobs`); max_tokens 0 (echo only) generates one token that the
    route drops, since the engine samples at least one."""
    seed = None if body.seed is None else (body.seed + j) % 2**63
    echo = getattr(body, "echo", False)
    max_tokens = max(1, max_tokens)
    try:
        return SamplingParams(
            n=1,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if body.top_k is None else body.top_k,
            min_p=body.min_p,
            max_tokens=max_tokens,
            min_tokens=min(body.min_tokens, max_tokens),
            stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            seed=seed,
            logprobs=logprobs,
            prompt_logprobs=body.logprobs if echo and body.logprobs is not None else None,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            logit_bias=tuple((bias or {}).items()),
            routing=None if body.routing is None else body.routing.model_dump(exclude_unset=True),
        )
    except SamplingParamsError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


async def submit(
    state: ServerState,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[str | list[int]],
    prefix: str,
    max_tokens: int | None,
    logprobs: int | None,
    grammar: Grammar | None = None,
) -> Generation:
    """Validate lengths, ask admission, and hand every choice to the engine. Output follows
    `grammar` if given (tool calls), else the request's structured-output fields."""
    check_model(state, body.model)
    check_library(state, body.library)
    check_report_routing(body)
    sampling_fields.check_fields(body)
    n = sampling_fields.choices_per_prompt(body)  # best_of candidates when given
    if n > state.settings.max_n:
        param = "n" if n == body.n else "best_of"
        raise APIError(400, f"{param} must be at most {state.settings.max_n}", param=param)
    config = getattr(state.engine, "model_config", None)
    bias = sampling_fields.logit_bias(body, getattr(config, "vocab_size", None))
    # Text prompts get BOS unless they follow a library that starts with one (prefix mode;
    # library/positions.py). Text is encoded here, on the tokenizer pool; the engine thread
    # gets the ids.
    library, loaded = await lookup_library(state, body.library)
    bos = request_wants_bos(library)
    prompts = [await tokenize(state, p, bos) for p in prompts]
    names = ("prompt", "max_tokens")
    if isinstance(body, ChatCompletionRequest):  # ids the chat template rendered
        bos_id = getattr(state.engine.tokenizer, "bos_token_id", None)
        prompts = [
            p if isinstance(p, str) else drop_template_bos(p, bos_id, library) for p in prompts
        ]
        given = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
        names = ("messages", given)
    counts = [len(p) for p in prompts]
    offset = int(getattr(library, "position_offset", None) or 0)
    resolved = [resolve_max_tokens(state, c, max_tokens, offset, params=names) for c in counts]
    params = [[sampling_params(body, mt, logprobs, j, bias) for j in range(n)] for mt in resolved]
    params = await structured_output.constrain(state, grammar or grammar_of(body), params)

    aengine: AsyncEngine = state.async_engine
    if not aengine.accepting:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    engine_config = getattr(state.engine, "config", None)
    top_k = body.top_k_chunks or int(getattr(engine_config, "default_top_k_chunks", 8))
    cost = request_cost(max(counts), max(resolved), library, loaded=loaded, top_k_chunks=top_k)
    decision = state.admission.decide(
        cost,
        aengine.load(),
        n * len(prompts),
        elapsed_s=elapsed_since_arrival() + state.loop_lag.seconds,
        key=current_key(),  # a 429 books its retry (bookings.py)
    )
    state.metrics.predicted_ttft.observe(decision.predicted_ttft_s)
    if not decision.accepted:
        state.metrics.rejections.labels(decision.verdict.value).inc()
        raise APIError(
            429,
            f"server overloaded ({decision.verdict.value}, predicted time to first token "
            f"{decision.predicted_ttft_s:.2f}s); retry after {decision.retry_after_s}s "
            f"(predicted drain {decision.drain_s:.2f}s)",
            code=decision.verdict.value,
            headers=decision.retry_headers(),
        )

    request_id = f"{prefix}-{uuid.uuid4().hex}"
    queue: asyncio.Queue = asyncio.Queue()
    streams: list[RequestStream] = []
    try:
        for i, (prompt, count) in enumerate(zip(prompts, counts)):
            ids = [f"{request_id}-{i * n + j}" for j in range(n)]
            streams += await aengine.add_requests(
                ids,
                prompt,
                params[i],
                count,
                library=body.library,
                top_k_chunks=body.top_k_chunks,
                report_routing=body.report_routing,
                queue=queue,
                cost=cost,
                predicted_ttft_s=decision.predicted_ttft_s,
                arrival=ARRIVAL.get(),
            )
    except BaseException as exc:
        aengine.abort([s.request_id for s in streams])
        if isinstance(exc, EngineDeadError):
            raise APIError(503, str(exc), code="shutting_down") from exc
        if isinstance(exc, Exception) and not isinstance(exc, APIError):
            raise from_engine_error(exc) from exc
        raise
    for count in counts:
        state.metrics.prompt_tokens.inc(count * n)
    return Generation(
        request_id=request_id,
        created=int(time.time()),
        model=state.model_name,
        streams=streams,
        queue=queue,
        choice_of={s.request_id: k for k, s in enumerate(streams)},
        params=params[0][0],
        num_prompts=len(prompts),
        n=n,
        report_routing=body.report_routing,
        delivered=state.admission.observe_delivery,
    )
