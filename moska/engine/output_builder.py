"""Turning a request's state after a step into a `RequestOutput` delta: incremental
detokenizing, stop strings (cut from the text; they end the request), the tail held back
while it could still grow into a stop string, and what is new since the last output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from moska.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from moska.engine.request import Request, RequestStatus
from moska.engine.step_output import RoutingReport
from moska.model.tokenizer import IncrementalDetokenizer


class _Finisher(Protocol):
    def finish_request(
        self, request_id: str, status: RequestStatus, reason: int | str | None = None
    ) -> Request | None: ...


@dataclass
class TrackedRequest:
    """What the engine keeps of a request beside the scheduler's state: its detokenizer,
    what was already returned, its logprobs and routing reports."""

    request: Request
    detok: IncrementalDetokenizer | None
    emitted: int = 0  # characters of text already returned
    sent_tokens: int = 0  # output tokens already returned
    logprobs: list[TokenLogprob] = field(default_factory=list)
    routing: RoutingReport | None = None  # of the last step that sampled it
    # with prompt_logprobs: one entry per prompt token scored so far (the first has none)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=lambda: [None])


def build_output(tr: TrackedRequest, scheduler: _Finisher) -> RequestOutput:
    """The output of `tr` after a step; a stop string found in its text finishes the
    request in `scheduler`. The caller drops a finished request."""
    req = tr.request
    params = req.sampling_params
    if tr.detok is not None:
        pending = req.output_token_ids[len(tr.detok.ids) - req.num_prompt_tokens :]
        if pending:
            tr.detok.add(pending)
        if req.is_finished:
            tr.detok.finish()
        text = tr.detok.text
    else:
        text = ""
    if params.stop:
        hit = _find_stop(text, params.stop, tr.emitted)
        if hit is not None:  # cut at the stop string; it ends the request even at its length
            text = text[: hit[0]]
            if not req.is_finished:
                scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED, hit[1])
            req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, hit[1]
    # Hold back a tail that could still grow into a stop string.
    visible = len(text)
    if params.stop and not req.is_finished:
        visible = max(tr.emitted, len(text) - max(len(s) for s in params.stop) + 1)
    new_text = text[tr.emitted : visible]
    new_ids = req.output_token_ids[tr.sent_tokens :]
    tr.emitted, tr.sent_tokens = visible, len(req.output_token_ids)  # tokens in flight: not yet
    finish = req.status.value if req.is_finished else None
    completion = CompletionOutput(
        index=0,
        text=text[:visible],
        token_ids=list(req.output_token_ids),
        finish_reason=finish,
        logprobs=list(tr.logprobs) if params.logprobs is not None else None,
    )
    output = RequestOutput(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        outputs=[completion],
        finished=req.is_finished,
        new_text=new_text,
        new_token_ids=list(new_ids),
        routed_chunks=None if tr.routing is None else tr.routing.chunks,
        routing_coverage=None if tr.routing is None else tr.routing.coverage,
        routing_layers=None if tr.routing is None else tr.routing.coverage_by_layer,
        library=req.library,
        num_cached_tokens=req.num_cached_tokens,
        num_reused_tokens=req.num_reused_tokens,
        # complete from the first output on (the prompt is computed before any sample),
        # so the list itself is handed out, not a copy per output
        prompt_logprobs=tr.prompt_logprobs if params.prompt_logprobs is not None else None,
    )
    return output


def _find_stop(text: str, stops: tuple[str, ...], emitted: int) -> tuple[int, str] | None:
    start = max(0, emitted - max(len(s) for s in stops))
    best = None
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best
