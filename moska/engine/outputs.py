"""What the engine hands back to callers after each step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # alternative token id -> logprob


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """State of one request after a step. `new_text`/`new_token_ids` are the delta since
    the previous output of the same request (for streaming); `outputs[0].text` is cumulative."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    routed_chunks: list[int] | None = None  # last step's chunks chosen (MoSKA), for debugging
    # With report_routing: share of the library's attention mass the routed chunks held,
    # averaged over sampled layers (first, middle, last) and query heads, last step.
    routing_coverage: float | None = None
    # With report_routing: that share per sampled layer (layer index -> share), last step.
    routing_layers: dict[int, float] | None = None
    # The library build the request reads (its handle, held from admission to the end; a
    # `LoadedLibrary`): routing reports name each routed chunk's document and span from it.
    library: Any = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    num_reused_tokens: int = 0  # prompt tokens whose KV a similar prompt's gave (SemShareKV)
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first
    # (nothing before it to predict it from), as vLLM returns them.
    prompt_logprobs: list[TokenLogprob | None] | None = None
