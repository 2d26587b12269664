"""Admission's queue replay: what the engine has (`Load`), what a request costs
(`RequestCost`), and `replay`, which runs the scheduler's loop over them on a clock of
predicted step times (see admission.py for why a replay and which steps it charges)."""

from __future__ import annotations

import math
from bisect import insort
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from moska.server.step_model import StepFeatures, feature_vector


@dataclass(frozen=True)
class RequestCost:
    """What one engine request will cost. `library_attend`: library tokens each of its
    rows attends to (top-k chunks x chunk size; 0 without a library). `library_load_tokens`:
    tokens of its library still to be loaded from disk (0 when loaded)."""

    prompt_tokens: int
    max_tokens: int = 16
    library_attend: int = 0
    library_load_tokens: int = 0


def request_cost(
    prompt_tokens: int,
    max_tokens: int,
    library: Any = None,
    *,
    loaded: bool = True,
    top_k_chunks: int,
) -> RequestCost:
    """The cost of one request: with a library (what is known of it, a loaded library or
    its manifest's info: `num_chunks`, `chunk_size`, `num_tokens`), the library tokens each
    row attends to (`top_k_chunks` chunks of it) and, if it is not `loaded` yet, its size
    to load. A damaged library costs nothing here (the engine rejects it)."""
    chunks, size, total = (
        getattr(library, k, None) for k in ("num_chunks", "chunk_size", "num_tokens")
    )
    if not (chunks and size and total):
        return RequestCost(prompt_tokens, max_tokens)
    attend = min(total, min(top_k_chunks, chunks) * size)
    return RequestCost(prompt_tokens, max_tokens, attend, 0 if loaded else int(total))


@dataclass(frozen=True)
class Load:
    """The engine's load as admission sees it. `waiting`: requests without a first token,
    in FIFO order (handed over or not yet); `running`: (decode tokens left, library_attend)
    of requests that have their first token."""

    waiting: tuple[RequestCost, ...] = ()
    running: tuple[tuple[int, int], ...] = ()
    num_pending: int = 0  # of `waiting`, submitted but not yet handed to the engine
    busy_s: float = 0.0  # how long the engine's current step has run (0: between steps)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def waiting_prefill_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.waiting)


@dataclass(frozen=True)
class EngineLimits:
    """The scheduler's limits the queue replay needs."""

    max_num_batched_tokens: int = 4096
    max_num_seqs: int = 256

    @classmethod
    def of(cls, engine: Any) -> EngineLimits:
        config = getattr(engine, "config", None)
        return cls(
            int(getattr(config, "max_num_batched_tokens", cls.max_num_batched_tokens)),
            int(getattr(config, "max_num_seqs", cls.max_num_seqs)),
        )


class Prediction(NamedTuple):
    ttft_s: float  # until the new requests' first token
    queue_s: float  # until at most `queue_target` requests wait (inf if never simulated)
    clear_s: float = 0.0  # until every request waiting ahead has its first token (its step
    # without the new requests' tokens)
    alone_s: float = 0.0  # the new request's own first token on an idle engine
    idle_s: float = 0.0  # until the engine would be idle without the new requests
    # from `clear_s`: (time, requests ahead still decoding from then), each time that count
    # drops (retry_drain: when a request that must share its prefill step with their decode
    # rows would fit)
    decoding: tuple[tuple[float, int], ...] = ()
    # per span of `decoding` (from one of its times to the next): (seconds a step of it,
    # steps) (retry_drain.factor_falls: the steps that bring the slowdown factor back)
    decode_steps: tuple[tuple[float, int], ...] = ()
    clear_steps: int = 0  # engine steps until `clear_s`
    first_s: float = 0.0  # the whole predicted time of the replay's first step (the one in
    # progress when `Load.busy_s` > 0: AdmissionController.predict rescales by how far past
    # it that step has already run)
    # until the new requests' first token: (start, end, seconds a step, steps) per run of
    # equal steps (retry_drain.first_admit: a request arriving during a step is predicted
    # at least a quarter of it, so admission reopens only at its end)
    spans: tuple[tuple[float, float, float, int], ...] = ()


def replay(
    new: RequestCost,
    load: Load,
    num_requests: int,
    queue_target: int | None,
    *,
    coef: np.ndarray,
    load_tps: float,
    limits: EngineLimits,
    max_sim_steps: int = 20_000,
) -> Prediction:
    """Replay the scheduler over `load` plus `num_requests` copies of `new` at the end,
    each step costing `coef` . features (seconds). `queue_s`: when the waiting count
    ahead first drops to `queue_target`."""
    budget, max_seqs = limits.max_num_batched_tokens, limits.max_num_seqs

    def step_s(prefill: int, pairs: int, decode: int) -> float:
        return float(feature_vector(StepFeatures(prefill, pairs, decode, 0)) @ coef)

    busy = max(0.0, load.busy_s)

    def left(dt: float, step: int) -> float:
        """`dt`, or for the step in progress what is left of it: at least a quarter
        (a step still running past its prediction is slower than predicted)."""
        return dt if step > 0 or busy == 0 else max(dt - busy, 0.25 * dt)

    # [tokens left to prefill, cost] per waiting request
    queue: deque[list[Any]] = deque([c.prompt_tokens, c] for c in load.waiting)
    queue.extend([new.prompt_tokens, new] for _ in range(num_requests))
    target = len(load.waiting) if queue_target is None else queue_target
    # library loads ahead (once per library size) and the new request's own
    loads = {c.library_load_tokens for c in load.waiting if c.library_load_tokens}
    t_ahead = sum(loads) / load_tps + coef[4] * load.num_pending / 1e2  # without the new ones
    if new.library_load_tokens:
        loads.add(new.library_load_tokens)
    t = sum(loads) / load_tps
    # handing requests to the engine (tokenization, bookkeeping) before its next step
    t += coef[4] * (load.num_pending + num_requests) / 1e2
    t_ahead -= t  # the new requests' own load and hand-over, taken off the clock for clear_s
    # the engine's step in progress is the replay's first step: only what it was handed
    # (not the pending requests) takes part, and only its remainder is still to wait
    in_step = len(load.waiting) - load.num_pending if busy > 0 else len(queue)
    finish = sorted(n for n, _ in load.running)  # step offsets at which running ones end
    lib_running = [(n, a) for n, a in load.running if a]
    step, ttft, queue_s = 0, math.inf, 0.0 if len(load.waiting) <= target else math.inf
    first_new = len(load.waiting)
    clear_s, clear_step = (t + t_ahead, 0) if not load.waiting else (math.inf, 0)
    ahead_finish = list(load.running)  # (finish offset, library_attend) ahead (idle_s)
    served = 0  # queue entries that got their first token
    first_s = 0.0
    prefilling = 0  # admitted entries without a first token (hold a seq slot)
    spans: list[tuple[float, float, float, int]] = []
    while step < max_sim_steps:
        while finish and finish[0] <= step:
            finish.pop(0)
        num_decode = len(finish)
        lib_pairs = sum(a for n, a in lib_running if n > step)
        slots = max_seqs - num_decode - prefilling
        tokens = budget - num_decode
        if not queue or (slots <= 0 and prefilling == 0) or tokens <= 0:
            if not queue or not finish:
                break
            # nothing can enter until a running request ends: jump there
            k = max(1, finish[0] - step)
            dt = step_s(0, lib_pairs, num_decode)
            first_s = first_s or dt
            spans.append((t, t + left(dt, step), dt, 1))
            t += left(dt, step) + (k - 1) * dt
            if k > 1:
                spans.append((spans[-1][1], t, dt, k - 1))
            step += k
            continue
        prefill = 0
        done: list[RequestCost] = []
        i, ahead = 0, (prefill, lib_pairs)  # the step's work on the requests ahead only
        while i < len(queue) and tokens > 0 and (step > 0 or i < in_step):
            entry = queue[i]
            fresh = entry[0] == entry[1].prompt_tokens
            if fresh and slots <= 0:
                break
            if fresh:
                slots -= 1
                prefilling += 1
            take = min(entry[0], tokens)
            entry[0] -= take
            tokens -= take
            prefill += take
            lib_pairs += take * entry[1].library_attend
            if served + i < first_new:
                ahead = (prefill, lib_pairs)
            if entry[0] == 0:
                done.append(entry[1])
                i += 1
            else:
                break
        own = served + len(done) >= first_new + num_requests  # our first token: now
        if served < first_new <= served + len(done):  # the last one ahead: clear_s
            clear_s = t + t_ahead + left(step_s(*ahead, num_decode), step)
            clear_step = step + 1
        dt = step_s(prefill, lib_pairs, num_decode)
        first_s = first_s or dt
        spans.append((t, t + left(dt, step), dt, 1))
        t += left(dt, step)
        step += 1
        for cost in done:
            queue.popleft()
            prefilling -= 1
            served += 1
            insort(finish, step + max(cost.max_tokens - 1, 0))
            if served <= first_new:
                ahead_finish.append((step + max(cost.max_tokens - 1, 0), cost.library_attend))
            if cost.library_attend:
                lib_running.append((step + max(cost.max_tokens - 1, 0), cost.library_attend))
        if own:
            ttft = t
        if math.isinf(queue_s) and len(load.waiting) - min(served, first_new) <= target:
            queue_s = t
        if not math.isinf(ttft):
            break
    alone = sum(loads) / load_tps if new.library_load_tokens else 0.0
    left_tokens = new.prompt_tokens
    while left_tokens > 0:  # its prefill in budget-sized steps, nothing else running
        take = min(left_tokens, budget)
        alone += step_s(take, take * new.library_attend, 0)
        left_tokens -= take
    if math.isinf(ttft):
        return Prediction(ttft, queue_s, clear_s, alone, math.inf, first_s=first_s)
    idle, decoding, steps = _idle_s(clear_s, clear_step, ahead_finish, step_s, left)
    return Prediction(
        ttft, queue_s, clear_s, alone, idle, decoding, steps, clear_step, first_s, tuple(spans)
    )


def _idle_s(
    t: float, step: int, ahead: list[tuple[int, int]], step_s: Any, left: Any
) -> tuple[float, tuple[tuple[float, int], ...], tuple[tuple[float, int], ...]]:
    """When the requests ahead would all have finished decoding, without the new requests:
    from when the last of them has its first token (`t`, before step `step`), their
    remaining decode steps (`ahead`: finish offset, library attention per row); and
    (time, count still decoding) from `t` on, with (step time, steps) between those
    times. Not from the new requests' own step: when
    they share the step that serves the last ones ahead, its prefill of those was left
    out, and a drain until idle on CPU came out 2.3 s where the engine was busy 18 s."""
    ends = sorted(e for e in ahead if e[0] > step)
    decoding, steps = [(t, len(ends))], []
    while ends:
        k = ends[0][0] - step
        dt = step_s(0, sum(a for _, a in ends), len(ends))
        t += left(dt, step) + (k - 1) * dt
        steps.append((dt, k))
        step = ends[0][0]
        while ends and ends[0][0] <= step:
            ends.pop(0)
        decoding.append((t, len(ends)))
    return t, tuple(decoding), tuple(steps)
