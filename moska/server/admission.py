"""Early rejection, as in Mooncake: refuse work that would miss its TTFT SLO, and say when
to come back.

Plain Python (numpy for one 5x5 solve), no clock of its own: the engine loop reports each
step (`observe_step`) and each first token (`observe_ttft`); the HTTP side asks `decide`
before it submits a request.

Why a queue model: under a burst the time to first token is not "my prefill", it is the
work of everything ahead of me in the FIFO. The scheduler (moska/engine/scheduler.py)
gives each step `max_num_batched_tokens`: running requests decode one token each first,
then waiting requests are admitted in order while fewer than `max_num_seqs` run; a
request admitted when the batch is full waits for running requests to *finish*, so their
remaining decode tokens are part of my wait. `predict` replays that loop over the known
queue (requests handed over but without a first token, then the new one) and the running
requests' remaining tokens, charging each step the learned step time.

Step time is linear in what a step does (`StepFeatures`): a fixed cost, prompt tokens,
library attention (each library row attends to top-k chunks of the library: tokens x
attended library tokens), decode rows, and requests handed to the engine in that loop
iteration (tokenization, bookkeeping). The coefficients are a ridge least-squares fit,
pulled toward a prior, over the last `window` observed steps. A request whose library is
not loaded yet also pays its load (a learned tokens/s rate).

Two things the fit alone missed under a burst (measured with `moska bench load` on a
shared 2-core CPU): (1) the queue is replayed from "now", but the engine is usually in the
middle of a step: a prefill step of 32 requests ran 2.8 s, and for all of it the queue
looked untouched, so admission stayed shut until the step ended and Retry-After (the
overshoot) was a third of the real drain. `Load.busy_s` says how long the current step
has run: the replay's first step is that step (requests submitted since cannot join it)
and only its remainder is charged. (2) The same decode step took 0.1 s alone and 0.7 s
while the event loop answered a burst or other processes took the cores: a fit over 256
steps follows that in tens of seconds. `slowdown`, a fast moving average of observed over
predicted step time, scales every predicted step, so a slower machine is seen within a
few steps (and a faster one as quickly).
"""

from __future__ import annotations

import enum
import math
import threading
import time
from bisect import insort
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from moska.server.step_model import DEFAULT_PRIOR, StepFeatures, StepModel, feature_vector


class Verdict(enum.Enum):
    ACCEPT = "accept"
    QUEUE_FULL = "queue_full"
    SLO = "ttft_slo"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    predicted_ttft_s: float
    retry_after_s: int  # whole seconds a client should wait before retrying; 0 if accepted
    drain_s: float = 0.0  # predicted seconds until a request like this one would be admitted

    @property
    def accepted(self) -> bool:
        return self.verdict is Verdict.ACCEPT


@dataclass(frozen=True)
class RequestCost:
    """What one engine request will cost. `library_attend`: library tokens each of its
    rows attends to (top-k chunks x chunk size; 0 without a library). `library_load_tokens`:
    tokens of its library still to be loaded from disk (0 when loaded)."""

    prompt_tokens: int
    max_tokens: int = 16
    library_attend: int = 0
    library_load_tokens: int = 0


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


@dataclass
class _Outcomes:
    """Recent (predicted, observed) TTFT pairs of admitted requests, for reports."""

    pairs: deque = field(default_factory=lambda: deque(maxlen=10_000))


class AdmissionController:
    """Predicts TTFT by replaying the queue and decides accept / reject. Thread-safe.

    `ttft_slo` None or 0: never reject for the SLO (predictions are still made and
    scored). `max_queue`: waiting requests beyond which new ones are rejected.
    `headroom`: admit when the prediction is within `headroom * ttft_slo`.
    """

    def __init__(
        self,
        ttft_slo: float | None,
        max_queue: int | None,
        *,
        limits: EngineLimits | None = None,
        prior: tuple[float, ...] = DEFAULT_PRIOR,
        prior_load_tps: float = 20_000.0,
        window: int = 256,
        headroom: float = 0.85,
        alpha: float = 0.1,
        slowdown_alpha: float = 0.25,
        max_sim_steps: int = 20_000,
    ) -> None:
        if ttft_slo is not None and ttft_slo < 0:
            raise ValueError(f"ttft_slo must be >= 0 seconds (0 or None: off), got {ttft_slo}")
        if prior_load_tps <= 0:
            raise ValueError("prior_load_tps must be positive")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0.0 < headroom <= 1.0:
            raise ValueError(f"headroom must be in (0, 1], got {headroom}")
        self.ttft_slo = ttft_slo or None
        self.max_queue = max_queue
        self.limits = limits or EngineLimits()
        self.headroom = headroom
        self.alpha = alpha
        self.max_sim_steps = max_sim_steps
        self.model = StepModel(prior, window)
        self.slowdown_alpha = slowdown_alpha
        self._log_slowdown = 0.0  # moving average of log(observed / predicted step time)
        self._load_tps = prior_load_tps
        self.outcomes = _Outcomes()
        self._lock = threading.Lock()
        self.shed_ttl_s = 0.05
        self._shed_memo: tuple[float, Decision | None] | None = None

    @property
    def load_tps(self) -> float:
        return self._load_tps

    @property
    def slowdown(self) -> float:
        """Recent steps' observed over predicted time (1: the fit is right as it stands)."""
        return math.exp(self._log_slowdown)

    # ---------------------------------------------------------------- learning

    def observe_step(self, seconds: float, features: StepFeatures, warmup: bool = False) -> None:
        """Fold one engine loop iteration in. `warmup`: it paid a one-off (a CUDA graph
        capture, a library load) and must not move the estimates."""
        if warmup or not seconds > 0 or not math.isfinite(seconds):
            return
        if features == StepFeatures():
            return
        with self._lock:
            predicted = self.model.step_s(features)
            if predicted > 0:
                ratio = min(max(seconds / predicted, 0.1), 10.0)
                self._log_slowdown += self.slowdown_alpha * (math.log(ratio) - self._log_slowdown)
            self.model.observe(features, seconds)

    def observe_library_load(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0 and seconds > 0:
            with self._lock:
                self._load_tps += self.alpha * (num_tokens / seconds - self._load_tps)

    def observe_ttft(self, predicted_s: float, observed_s: float) -> None:
        """An admitted request got its first token: kept for reports (`outcomes`), not fed
        back. Requests admitted after it may join its prefill step, so an early request
        of a burst waits longer than predicted; but each joiner was admitted only if that
        shared step still ends within the SLO (FIFO: its own prediction is that step's
        end), so the promise holds. A correction learned from those errors would inflate
        every prediction and, once nothing is admitted, never unlearn."""
        if predicted_s > 0 and observed_s > 0:
            with self._lock:
                self.outcomes.pairs.append((predicted_s, observed_s))

    # ---------------------------------------------------------------- prediction

    def step_s(self, features: StepFeatures) -> float:
        """Predicted seconds of a step like `features` now (the fit times `slowdown`)."""
        with self._lock:
            return self.model.step_s(features) * math.exp(self._log_slowdown)

    def predict(
        self, new: RequestCost, load: Load, num_requests: int = 1, queue_target: int | None = None
    ) -> Prediction:
        """Replay the scheduler over `load` plus `num_requests` copies of `new` at the end.
        `queue_s`: when the waiting count ahead first drops to `queue_target`."""
        with self._lock:
            coef = self.model.coef * math.exp(self._log_slowdown)
            load_tps = self._load_tps
        budget, max_seqs = self.limits.max_num_batched_tokens, self.limits.max_num_seqs

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
        if new.library_load_tokens:
            loads.add(new.library_load_tokens)
        t = sum(loads) / load_tps
        # handing requests to the engine (tokenization, bookkeeping) before its next step
        t += coef[4] * (load.num_pending + num_requests) / 1e2
        # the engine's step in progress is the replay's first step: only what it was handed
        # (not the pending requests) takes part, and only its remainder is still to wait
        in_step = len(load.waiting) - load.num_pending if busy > 0 else len(queue)
        finish = sorted(n for n, _ in load.running)  # step offsets at which running ones end
        lib_running = [(n, a) for n, a in load.running if a]
        step, ttft, queue_s = 0, math.inf, 0.0 if len(load.waiting) <= target else math.inf
        first_new = len(load.waiting)
        served = 0  # queue entries that got their first token
        prefilling = 0  # admitted entries without a first token (hold a seq slot)
        while step < self.max_sim_steps:
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
                t += left(dt, step) + (k - 1) * dt
                step += k
                continue
            prefill = 0
            done: list[RequestCost] = []
            i = 0
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
                if entry[0] == 0:
                    done.append(entry[1])
                    i += 1
                else:
                    break
            own = served + len(done) >= first_new + num_requests  # our first token: now
            t += left(step_s(prefill, lib_pairs, num_decode), step)
            step += 1
            for cost in done:
                queue.popleft()
                prefilling -= 1
                served += 1
                insort(finish, step + max(cost.max_tokens - 1, 0))
                if cost.library_attend:
                    lib_running.append((step + max(cost.max_tokens - 1, 0), cost.library_attend))
            if own:
                ttft = t
            if math.isinf(queue_s) and len(load.waiting) - min(served, first_new) <= target:
                queue_s = t
            if not math.isinf(ttft):
                break
        return Prediction(ttft, queue_s)

    def predict_ttft(self, new: RequestCost | int, load: Load, num_requests: int = 1) -> float:
        cost = RequestCost(new) if isinstance(new, int) else new
        return self.predict(cost, load, num_requests).ttft_s

    def decide(
        self, new: RequestCost | int, load: Load, num_requests: int = 1, elapsed_s: float = 0.0
    ) -> Decision:
        """Accept or reject `num_requests` requests like `new` (the n choices and prompts
        of one HTTP request are admitted together). `elapsed_s`: time the request already
        spent in the server before this decision (reading, validating, tokenizing); it
        counts against the SLO and is part of the predicted TTFT. A rejection's
        Retry-After is the predicted time until a request like this would be admitted."""
        cost = RequestCost(new) if isinstance(new, int) else new
        queue_full = self.max_queue is not None and load.num_waiting + num_requests > self.max_queue
        target = (
            max(0, self.max_queue - num_requests)
            if queue_full and self.max_queue is not None
            else None
        )
        pred = self.predict(cost, load, num_requests, target)
        ttft = pred.ttft_s + max(0.0, elapsed_s)
        if queue_full:
            return Decision(Verdict.QUEUE_FULL, ttft, _retry_after(pred.queue_s), pred.queue_s)
        idle = not load.waiting and not load.running
        # An idle server admits: waiting cannot help, and the estimates only learn from
        # work that runs (a prior that errs slow must not lock a request type out).
        if self.ttft_slo is not None and not idle and ttft > self.headroom * self.ttft_slo:
            # FIFO: arriving later, the same work ahead ends at the same time, so the
            # wait until the prediction fits the SLO is the overshoot; plus the wait at
            # the door, which a retry meets again while the burst that caused it lasts
            drain = max(0.0, pred.ttft_s - self.headroom * self.ttft_slo) + max(0.0, elapsed_s)
            return Decision(Verdict.SLO, ttft, _retry_after(drain), drain)
        return Decision(Verdict.ACCEPT, ttft, 0)

    def shed(self, load: Load, elapsed_s: float = 0.0) -> Decision | None:
        """The rejection that the smallest request (one prompt token) would get now, or
        None: when even it would miss the SLO, the front end answers 429 before reading a
        body. `elapsed_s`: what a request waits before the door now (the event loop's
        lag). Memoized for `shed_ttl_s`, so a burst costs one prediction per interval."""
        if self.ttft_slo is None and self.max_queue is None:
            return None
        now = time.monotonic()
        with self._lock:
            cached = self._shed_memo
        if cached is not None and now - cached[0] < self.shed_ttl_s:
            return cached[1]
        decision = self.decide(RequestCost(1, 1), load, elapsed_s=elapsed_s)
        result = None if decision.accepted else decision
        with self._lock:
            self._shed_memo = (now, result)
        return result


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


def _retry_after(seconds: float) -> int:
    """Whole seconds for the header: rounded (the drain estimate is the point, ceil would
    double a one-second drain), at least 1."""
    if not math.isfinite(seconds):
        return 3600
    return max(1, round(seconds))
