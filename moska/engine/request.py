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
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from moska.engine.sampling_params import SamplingParams


class LibraryHandle(Protocol):
    """What a request holds of its shared library from admission to its end (a
    `moska.library.loaded.LoadedLibrary`): the build it reads, never a name to look up
    again, so deleting or rebuilding the name cannot change what a running request reads."""

    @property
    def name(self) -> str: ...

    @property
    def build_id(self) -> str: ...

    @property
    def position_offset(self) -> int: ...


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
    library: LibraryHandle | None = None  # the shared KV library build it reads, or None
    top_k_chunks: int | None = None  # chunks routed per step; None = library default
    report_routing: bool = False  # measure the attention mass the routed chunks cover
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    # SemShareKV (moska.semshare.ReusePlan): the stored similar prompt whose KV it reuses
    semantic: Any = None
    num_reused_tokens: int = 0  # prompt tokens whose KV came from `semantic`'s reference
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    # Tokens sampled by a step still on the device (asynchronous scheduling): counted in
    # num_tokens and num_output_tokens, not in output_token_ids until they reach the host.
    # Changed only through add_in_flight / land_in_flight / drop_in_flight.
    num_in_flight: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")

    @property
    def library_name(self) -> str | None:
        return None if self.library is None else self.library.name

    @property
    def cache_namespace(self) -> Hashable:
        """What the request's unique KV depends on besides its tokens: the library build in
        front of it (by build id, never by name) and how many of its chunks are routed."""
        build = None if self.library is None else self.library.build_id
        if self.semantic is not None:  # approximate KV: never shared through the prefix cache
            return (build, self.top_k_chunks, "semantic", self.request_id)
        return (build, self.top_k_chunks)

    @property
    def private_kv(self) -> bool:
        """Whether its KV is approximate (SemShareKV): the prefix cache never registers it
        (no block of it could be shared: its namespace is its own); it may still take other
        requests' exact blocks for its leading tokens (looked up in `exact_namespace`)."""
        return self.semantic is not None

    @property
    def shared_blocks(self) -> dict[int, int] | None:
        """Blocks of its SemShareKV reference it takes as they are (table index -> block id;
        `moska/semshare/sharing.py`), read by the block manager at allocation; None if none."""
        return None if self.semantic is None else self.semantic.shared_blocks(self)

    @property
    def exact_namespace(self) -> Hashable:
        """The namespace of the exact KV it could read: `cache_namespace` without a plan."""
        return (None if self.library is None else self.library.build_id, self.top_k_chunks)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt and generated tokens, those still in flight included."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_in_flight

    @property
    def num_known_tokens(self) -> int:
        """Tokens the host has: num_tokens less those in flight."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """The known tokens (a token in flight is not known yet)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (a decode step reads
        one token of each request). `end` must not pass the known tokens."""
        assert end <= self.num_known_tokens, (self.request_id, end, self.num_known_tokens)
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, those still in flight included (what max_tokens counts)."""
        return len(self.output_token_ids) + self.num_in_flight

    def add_in_flight(self) -> None:
        """A step that samples this request's next token was queued; the token is not known."""
        self.num_in_flight += 1

    def land_in_flight(self, token: int) -> None:
        """The oldest token in flight reached the host and is kept: it joins the output."""
        assert self.num_in_flight > 0, self.request_id
        self.num_in_flight -= 1
        self.output_token_ids.append(token)

    def drop_in_flight(self) -> None:
        """The oldest token in flight is not kept (a stop token, or a rolled-back step)."""
        assert self.num_in_flight > 0, self.request_id
        self.num_in_flight -= 1

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def check_invariants(self) -> None:
        assert 0 <= self.num_computed_tokens <= self.num_tokens, (
            self.num_computed_tokens,
            self.num_tokens,
        )
        assert self.num_in_flight >= 0, self.num_in_flight
