"""Settings of the continuous-batching scheduler."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    """One token budget per step shared by prefill chunks and decodes.

    max_num_batched_tokens: tokens computed per step, over all requests.
    max_num_seqs: requests running at once (admitted, holding KV blocks).
    enable_chunked_prefill: split a prompt longer than the remaining budget over steps;
        without it a prompt is admitted only whole, so it must fit max_num_batched_tokens.
    """

    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError(
                f"max_num_seqs ({self.max_num_seqs}) cannot exceed max_num_batched_tokens "
                f"({self.max_num_batched_tokens}): each running request decodes one token "
                "per step; raise max_num_batched_tokens or lower max_num_seqs"
            )
