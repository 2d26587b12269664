"""Request state shared by the scheduler, the model runner and the engine.

Length vocabulary (used everywhere, asserted here):
- num_prompt_tokens: tokens of the prompt.
- num_tokens: prompt + generated tokens so far (len(all_token_ids)).
- num_computed_tokens: tokens whose KV is in the unique cache; always <= num_tokens.
  A step computes tokens [num_computed_tokens, num_computed_tokens + num_new_tokens).
  When that reaches num_tokens, the step also samples one new token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from moska.engine.sampling_params import SamplingParams


# Stands in an output list for a token sampled by a step still in flight (asynchronous
# scheduling); the engine replaces it once the token reaches the host. Never a real id.
PLACEHOLDER_TOKEN = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    library: str | None = None  # name of a loaded shared KV library, or None
    top_k_chunks: int | None = None  # chunks routed per step; None = library default
    report_routing: bool = False  # measure the attention mass the routed chunks cover
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (a decode step reads
        one token of each request)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def check_invariants(self) -> None:
        assert 0 <= self.num_computed_tokens <= self.num_tokens, (
            self.num_computed_tokens,
            self.num_tokens,
        )
