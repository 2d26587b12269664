"""/v1/completions' `echo` and `best_of`: what a choice returns beyond the generated text.

echo: the prompt's text comes before the completion (a text prompt as sent, a token prompt
decoded) and, with `logprobs`, the prompt tokens' logprobs come before the completion's,
the first one null (nothing predicts it), as OpenAI and vLLM return them. With
`max_tokens: 0` (score only, lm-evaluation-harness' loglikelihood) the engine still samples
one token, which is dropped: the choice holds the prompt alone, finish_reason "length".
best_of: every candidate is generated with logprobs; the n with the highest cumulative
logprob of their sampled tokens are returned, renumbered 0..n-1 per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

from moska.engine.outputs import RequestOutput
from moska.server.errors import APIError
from moska.server.logprobs_format import completion_logprobs
from moska.server.protocol import CompletionRequest
from moska.server.sampling_fields import best_of_order
from moska.server.state import ServerState


class _Entry(NamedTuple):
    token_id: int
    logprob: float | None
    top: dict[int, float] | None


@dataclass
class Echo:
    """How a request's choices echo their prompt."""

    texts: list[str]  # per prompt
    n: int  # choices per prompt
    logprobs: bool
    score_only: bool  # max_tokens 0: drop the generated token

    def prompt_text(self, idx: int) -> str:
        return self.texts[idx // self.n]

    def prompt_logprobs(self, state: ServerState, out: RequestOutput) -> dict | None:
        """The prompt part of a choice's logprobs (text offsets from 0), or None."""
        if not self.logprobs:
            return None
        lps = out.prompt_logprobs or []
        entries = [
            _Entry(t, None, None) if e is None else _Entry(t, e.logprob, e.top)
            for t, e in zip(out.prompt_token_ids, lps)
        ]
        return completion_logprobs(state, entries, 0)


async def make_echo(state: ServerState, body: CompletionRequest, prompts: list) -> Echo | None:
    if not body.echo:
        return None
    tok = state.engine.tokenizer
    texts = []
    for p in prompts:
        if isinstance(p, str):
            texts.append(p)
        else:
            if tok is None:
                msg = "echo of token ids needs the model's tokenizer (no tokenizer.json)"
                raise APIError(400, msg, param="echo")
            ids = list(p)
            texts.append(await state.tokenizers.run(partial(tok.decode, ids), len(ids), "prompt"))
    return Echo(texts, body.n, body.logprobs is not None, body.max_tokens == 0)


def join_logprobs(head: dict | None, tail: dict | None) -> dict | None:
    """Two runs of completion logprobs as one (the tail's offsets already continue)."""
    if head is None or tail is None:
        return head or tail
    return {key: head[key] + tail[key] for key in head}


def choice(
    state: ServerState, idx: int, out: RequestOutput, echo: Echo | None, logprobs: bool
) -> tuple[str, dict | None, int]:
    """(text, logprobs, completion tokens) of a finished choice."""
    comp = out.outputs[0]
    text, entries, tokens = comp.text, comp.logprobs or [], len(comp.token_ids)
    if echo is not None and echo.score_only:
        text, entries, tokens = "", [], 0
    head = ""
    lp_head = None
    if echo is not None:
        head = echo.prompt_text(idx)
        lp_head = echo.prompt_logprobs(state, out)
    lp = None
    if logprobs:  # the completion's offsets count from where its text starts
        lp = join_logprobs(lp_head, completion_logprobs(state, entries, len(head)))
    return head + text, lp, tokens


def pick_best(last: dict[int, RequestOutput], candidates: int, n: int) -> dict[int, Any]:
    """best_of: for each prompt's `candidates` outputs, the `n` most likely, renumbered."""
    picked: dict[int, RequestOutput] = {}
    for p in range(len(last) // candidates):
        cum = {}
        for i in range(p * candidates, (p + 1) * candidates):
            lps = last[i].outputs[0].logprobs or []
            cum[i] = sum(e.logprob for e in lps)
        for rank, i in enumerate(best_of_order(cum, n)):
            picked[p * n + rank] = last[i]
    return picked
