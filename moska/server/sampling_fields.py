"""The sampling fields of a request: each one honoured, or a 400 that names it.

OpenAI's and vLLM's fields map onto `SamplingParams`; fields moska does not implement are
declared (server/refused_fields.py) so that anything but their default is refused here
rather than silently ignored. /v1/completions' `echo`, `best_of` and `suffix` are checked
here too; the route does the echoing and picks the best_of candidates.
"""

from __future__ import annotations

from moska.server.errors import APIError
from moska.server.protocol import ChatCompletionRequest, CompletionRequest
from moska.server.refused_fields import check_refused


def check_fields(body: CompletionRequest | ChatCompletionRequest) -> None:
    """400 for a field moska accepts only at its default, and for OpenAI's own rules."""
    check_refused(body)
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(
                400,
                "top_logprobs needs logprobs: set logprobs to true",
                param="top_logprobs",
                code="invalid_request",
            )
        return
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_field")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(
            400,
            "max_tokens must be at least 1 (0 only with echo, to score the prompt)",
            param="max_tokens",
        )
    if body.best_of is not None:
        if body.best_of < body.n:
            raise APIError(400, "best_of must be at least n", param="best_of")
        if body.stream and body.best_of > 1:
            raise APIError(400, "best_of cannot be used with stream", param="best_of")


def logit_bias(body: CompletionRequest | ChatCompletionRequest, vocab: int | None) -> dict:
    """The request's logit_bias as {token id: bias}; 400 naming logit_bias for a key that is
    not a token id of this model or a bias outside [-100, 100]."""
    out: dict[int, float] = {}
    for key, bias in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if token < 0 or (vocab is not None and token >= vocab):
            limit = f" in [0, {vocab})" if vocab is not None else ""
            raise APIError(
                400,
                f"logit_bias key {key!r} is not a token id{limit} of this model",
                param="logit_bias",
            )
        if not -100.0 <= bias <= 100.0:
            raise APIError(
                400, f"logit_bias values must be in [-100, 100], got {bias}", param="logit_bias"
            )
        out[token] = bias
    return out


def choices_per_prompt(body: CompletionRequest | ChatCompletionRequest) -> int:
    """Engine requests per prompt: best_of candidates when given, else n."""
    return getattr(body, "best_of", None) or body.n


def best_of_order(cumulative: dict[int, float], n: int) -> list[int]:
    """The `n` candidate indices with the highest cumulative logprob, best first (ties by
    index, so the result does not depend on finishing order)."""
    return sorted(cumulative, key=lambda i: (-cumulative[i], i))[:n]
