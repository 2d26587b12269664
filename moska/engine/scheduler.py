"""Continuous-batching scheduler (plain Python, no torch).

One token budget per step, no separate prefill and decode phases: each request's
`num_computed_tokens` catches up with its `num_tokens`. A step gives running requests
their tokens first (a decode is 1 token, an unfinished prefill its next chunk), in
admission order, then admits waiting requests first-in first-out, applying prefix-cache
hits on admission. When KV blocks run out, the most recently admitted running request is
preempted by recompute: its blocks are freed, its computed count reset to 0, and it goes
back to the front of the waiting queue (its full blocks usually stay in the prefix cache,
so recomputing is mostly a cache hit).

Stop tokens: an end-of-sequence token (unless `ignore_eos`) or one of `stop_token_ids`
finishes the request with FINISHED_STOPPED once `min_tokens` tokens were generated before
it, and is NOT appended to `output_token_ids` (`stop_reason` is None for eos, the token id
otherwise). Before `min_tokens` such a token is kept as an ordinary token. Stop strings are
the engine's: it calls `finish_request` after detokenizing.

Call order per step: `schedule()`, run the model on the scheduled tokens, then
`update_from_output()` before the next `schedule()`.

Asynchronous scheduling: `update_from_output(output, None)` right after the step is
queued counts each sampled token as in flight (`Request.num_in_flight`: in `num_tokens`,
not yet in `output_token_ids`; length limits apply, stop tokens cannot, the token is
unknown), so the next step can be scheduled while this one runs. `resolve_in_flight()`
later lands the real token and applies the stop tokens. One step is in flight at most.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from moska.cache.block_manager import BlockManager
from moska.engine.request import Request, RequestStatus
from moska.engine.scheduler_config import SchedulerConfig


class RequestTooLarge(ValueError):
    """The request can never be scheduled with this cache and budget."""


@dataclass
class ScheduledRequest:
    """Compute tokens `[request.num_computed_tokens, + num_new_tokens)` this step."""

    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the request's last token, so a token is sampled.
        Valid between `schedule()` and `update_from_output()`."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # grouped by library (stable)
    preempted: list[Request]  # lost their KV this step; back in the waiting queue
    num_batched_tokens: int
    finished_request_ids: list[str] = field(default_factory=list)  # since the last schedule()


def _library_key(s: ScheduledRequest) -> tuple[bool, str]:
    lib = s.request.library
    return (lib is not None, "" if lib is None else lib.build_id)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self._requests: dict[str, Request] = {}  # unfinished, waiting or running
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admission order
        self._waiting_tokens = 0
        self._finished_ids: list[str] = []
        self._awaiting_update = False
        self._suspects: set[str] = set()  # ids that run alone after a failed step

    # --- queries ------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def waiting_prefill_tokens(self) -> int:
        """Tokens still to compute for the waiting queue (before prefix-cache hits)."""
        return self._waiting_tokens

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # --- queue helpers ------------------------------------------------------------------
    def _push_waiting(self, request: Request, front: bool = False) -> None:
        assert request.num_computed_tokens == 0
        assert not self.block_manager.block_table(request.request_id)
        if front:
            self._waiting.appendleft(request)
        else:
            self._waiting.append(request)
        self._waiting_tokens += request.num_tokens

    def _pop_waiting(self) -> Request:
        request = self._waiting.popleft()
        self._waiting_tokens -= request.num_tokens
        return request

    # --- requests in and out ------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a new request; raises RequestTooLarge if it could never run."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r} is not a new request")
        bm = self.block_manager
        # The last sampled token's KV is never computed.
        max_kv_tokens = request.num_prompt_tokens + request.sampling_params.max_tokens - 1
        if bm.num_blocks_for(max_kv_tokens) > bm.num_blocks:
            raise RequestTooLarge(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                f"({request.sampling_params.max_tokens}) exceeds the KV cache capacity "
                f"({bm.num_blocks * bm.block_size} tokens); shorten the prompt, lower "
                "max_tokens or give the engine more KV cache memory"
            )
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and request.num_prompt_tokens > budget:
            raise RequestTooLarge(
                f"prompt ({request.num_prompt_tokens} tokens) exceeds max_num_batched_tokens "
                f"({budget}) and chunked prefill is disabled; enable chunked prefill or raise "
                "max_num_batched_tokens"
            )
        self._requests[request.request_id] = request
        self._push_waiting(request)

    def finish_request(
        self, request_id: str, status: RequestStatus, reason: int | str | None = None
    ) -> Request | None:
        """End a request wherever it is and free its blocks; None if it is not unfinished."""
        if not status.finished:
            raise ValueError(f"{status} is not a finished status")
        request = self._requests.get(request_id)
        if request is None:
            return None
        request.status = status
        request.stop_reason = reason
        self._release(request)
        return request

    def abort_request(self, request_id: str) -> Request | None:
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def _release(self, request: Request) -> None:
        # Identity, not ==: Request is a dataclass whose == compares every field.
        running = [r for r in self._running if r is not request]
        if len(running) < len(self._running):
            self._running = running
        else:
            waiting = deque(r for r in self._waiting if r is not request)
            if len(waiting) < len(self._waiting):
                self._waiting = waiting
                self._waiting_tokens -= request.num_tokens
        self.block_manager.free(request)
        del self._requests[request.request_id]
        self._finished_ids.append(request.request_id)

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self._push_waiting(request, front=True)

    # --- one step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        assert not self._awaiting_update, "update_from_output() must follow each schedule()"
        finished_ids, self._finished_ids = self._finished_ids, []
        bm = self.block_manager
        if not self._requests:
            bm.check_integrity()
            # Blocks held outside the scheduler are no leak: a decode instance holds a P/D
            # transfer's blocks until its request arrives, also while none is unfinished.
            leaked = [h.request_id for h in bm.holders() if isinstance(h, Request)]
            assert not leaked, f"blocks held with no unfinished request: {leaked[:8]}"
            self._suspects.clear()
            return SchedulerOutput([], [], 0, finished_ids)
        if self._suspects and (alone := self._schedule_suspect(finished_ids)) is not None:
            return alone

        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self._running) and budget > 0:
            request = self._running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            assert num_new > 0, request.request_id
            while not bm.allocate_slots(request, num_new):
                victim = self._running.pop()  # most recently admitted; never one before i
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted (it was the last running one)

        while (
            not preempted
            and self._waiting
            and budget > 0
            and len(self._running) < self.config.max_num_seqs
        ):
            request = self._waiting[0]
            # prompt_logprobs need logits at every prompt position: no prefix-cache hits
            num_cached = (
                0
                if request.sampling_params.prompt_logprobs is not None
                else (bm.match_prefix(request))
            )
            remaining = request.num_tokens - num_cached
            num_new = min(remaining, budget)
            resumed = request.status is RequestStatus.PREEMPTED
            if num_new < remaining and not self.config.enable_chunked_prefill and not resumed:
                break
            if not bm.allocate_slots(request, num_new, num_cached_tokens=num_cached):
                break
            self._pop_waiting()
            if not resumed:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self._running.append(request)
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

        scheduled.sort(key=_library_key)
        self._awaiting_update = bool(scheduled)
        num_batched = self.config.max_num_batched_tokens - budget
        return SchedulerOutput(scheduled, preempted, num_batched, finished_ids)

    def update_from_output(
        self, output: SchedulerOutput, sampled: dict[str, int] | None
    ) -> list[Request]:
        """Advance computed counts, append sampled tokens, apply stop rules, free finished
        requests. Returns the requests that sampled a token this step (finished or not).
        `sampled` None: the tokens are not known yet, they are counted in flight (see the
        module docstring)."""
        self._awaiting_update = False
        bm = self.block_manager
        got_token: list[Request] = []
        for item in output.scheduled:
            request = item.request
            self._suspects.discard(request.request_id)  # its step went through
            if request.is_finished:  # aborted between schedule() and now
                continue
            request.num_computed_tokens += item.num_new_tokens
            request.check_invariants()
            if request.num_computed_tokens == request.num_tokens:
                if sampled is None:
                    self._add_in_flight(request)
                elif request.request_id not in sampled:
                    raise KeyError(f"no sampled token for request {request.request_id!r}")
                else:
                    self._append_token(request, sampled[request.request_id])
                got_token.append(request)
            else:
                assert sampled is None or request.request_id not in sampled, request.request_id
            bm.cache_full_blocks(request)
            if request.is_finished:
                self._release(request)
        return got_token

    def recover_step(self, output: SchedulerOutput, extra: Sequence[Request] = ()) -> list[Request]:
        """Roll back a step that raised (the runner, a kernel, the sampler) so the next
        `schedule()` starts from a consistent state, and find the request that made it fail.

        The step's requests (and `extra`: those of a step still in flight, whose tokens are
        not known) are preempted by recompute and become *suspects*; each suspect then
        runs one step alone before it batches with others again. A request whose step
        fails while it ran alone is the culprit: it ends as aborted and is returned (with
        any that cannot be recovered: one that reached its length on a token in flight). So
        a poisoned request fails alone and every other request goes on."""
        self._awaiting_update = False
        reqs = list(
            {id(r): r for r in [i.request for i in output.scheduled] + list(extra)}.values()
        )
        alone = len(reqs) == 1
        failed: list[Request] = []
        for request in reversed(reqs):  # pushed to the front: keep their order
            if request.num_in_flight:
                if request.status is RequestStatus.PREEMPTED and request in self._waiting:
                    self._waiting_tokens -= 1  # queued with the token it now drops
                request.drop_in_flight()  # never reached the host: sampled again
                if request.request_id not in self._requests:  # released at its length
                    failed.append(request)
                    continue
            if request.request_id not in self._requests:
                continue  # finished before this step failed (a stop token resolved)
            if alone:
                self.finish_request(request.request_id, RequestStatus.FINISHED_ABORTED)
                failed.append(request)
                continue
            if request.status is RequestStatus.RUNNING:  # else already back in the queue
                self._running = [r for r in self._running if r is not request]
                self._preempt(request)
            self._suspects.add(request.request_id)
        self.block_manager.check_integrity()
        return failed

    def _schedule_suspect(self, finished_ids: list[str]) -> SchedulerOutput | None:
        """A step of the first suspect alone (see `recover_step`), or None (no suspect left
        waiting, or no room for it: then scheduling goes on as usual)."""
        suspect = next((r for r in self._waiting if r.request_id in self._suspects), None)
        if suspect is None:
            self._suspects.clear()
            return None
        bm = self.block_manager
        num_cached = bm.match_prefix(suspect)
        num_new = min(suspect.num_tokens - num_cached, self.config.max_num_batched_tokens)
        if len(self._running) >= self.config.max_num_seqs or not bm.allocate_slots(
            suspect, num_new, num_cached_tokens=num_cached
        ):
            self._suspects.clear()
            return None
        self._waiting = deque(r for r in self._waiting if r is not suspect)
        self._waiting_tokens -= suspect.num_tokens
        suspect.status = RequestStatus.RUNNING
        self._running.append(suspect)
        self._awaiting_update = True
        return SchedulerOutput([ScheduledRequest(suspect, num_new)], [], num_new, finished_ids)

    def resolve_in_flight(self, request: Request, token: int) -> None:
        """The request's token in flight reached the host as `token`: land it, or, a stop
        token, drop it and end the request (FINISHED_STOPPED, also over a FINISHED_LENGTH
        the token in flight reached)."""
        assert request.num_in_flight == 1, request.request_id
        stop = self._stop_reason(request, token, request.num_output_tokens - 1)
        if stop is False:
            request.land_in_flight(token)
            return
        if request.request_id in self._requests:  # release it as it was queued, then drop
            self.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED, stop)
        else:  # already released (it reached its length with the token in flight)
            request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, stop
        request.drop_in_flight()

    @staticmethod
    def _stop_reason(request: Request, token: int, num_before: int):
        """False if `token` does not stop the request, else its stop_reason (None for eos)."""
        params = request.sampling_params
        if num_before < params.min_tokens:
            return False
        eos = request.eos_token_id
        if eos is not None and token == eos and not params.ignore_eos:
            return None
        if token in params.stop_token_ids:
            return token
        return False

    def _add_in_flight(self, request: Request) -> None:
        """Count the token a queued step samples for `request`; its length limit applies."""
        assert request.num_in_flight == 0, f"{request.request_id}: a token already in flight"
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        request.add_in_flight()
        if request.num_output_tokens >= request.sampling_params.max_tokens:
            request.status = RequestStatus.FINISHED_LENGTH

    def _append_token(self, request: Request, token: int) -> None:
        params = request.sampling_params
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        stop = self._stop_reason(request, token, request.num_output_tokens)
        if stop is not False:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = stop
            return
        request.output_token_ids.append(token)
        if request.num_output_tokens >= params.max_tokens:
            request.status = RequestStatus.FINISHED_LENGTH
