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

Why the step in progress, the slowdown factor, the front door and the delivery margin
count, and how a 429's promise is scored and learnt: docs/admission.md.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from moska.server import retry_drain, storm_anchor
from moska.server.admission_bookings import BookedDrains
from moska.server.admission_decision import Decision, Verdict
from moska.server.admission_door import DoorDrains
from moska.server.admission_promises import PromiseScale, group_of
from moska.server.bookings import Booking, Bookings
from moska.server.burst_admits import ENGINE_SHARE
from moska.server.front_door import BODY_BYTES, FrontDoor
from moska.server.queue_replay import EngineLimits, Load, Prediction, RequestCost, replay
from moska.server.retry_drain import FactorFall, LibraryRequests, drain_s
from moska.server.slowdown import Slowdown
from moska.server.step_model import DEFAULT_PRIOR, StepFeatures, StepModel
from moska.server.ttft_margin import TtftMargin

__all__ = ["AdmissionController", "Decision", "EngineLimits", "Load", "RequestCost", "Verdict"]


@dataclass
class _Outcomes:
    """Recent (predicted, observed) TTFT pairs of admitted requests, for reports."""

    pairs: deque = field(default_factory=lambda: deque(maxlen=10_000))


class AdmissionController(BookedDrains, DoorDrains):
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
        deviations: float = 0.5,
        library_risk: float = 1.5,
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
        self.slow = Slowdown(slowdown_alpha, deviations)  # slowdown.py: why robust, `cold`
        self.booked_slow = Slowdown(slowdown_alpha, deviations, rest_gap_s=0.01, decode_only="fall")
        self.library_risk = library_risk
        self._load_tps = prior_load_tps
        self.outcomes = _Outcomes()
        self._lock = threading.Lock()
        self.shed_ttl_s = 0.05
        self._shed_memo: tuple[float, int, Decision | None] | None = None
        self.door = FrontDoor()  # requests past the door, not yet decided
        self.margin = TtftMargin()  # how late recent promises came true (ttft_margin.py)
        # admitted requests' prompt and max_tokens; no library attention: the door is only
        # a first filter (each request meets `decide` with its own cost), and a mean over
        # a mix where one library prefill costs 10 s on CPU shed nearly every plain request
        self._typical = [128.0, 16.0]
        # what a library request at the door is assumed to cost (`Decision.for_library`)
        self.library_requests = LibraryRequests(alpha)
        self._door_memo: tuple[float, int, int, int] | None = None  # time, inside, waiting, n
        # a door drain counts the loop lag; not the connections ahead (door_storm, off since
        # session 16: a retry sent in a storm waits it out in the server; README)
        self.door_lag, self.door_storm = True, False
        self.engine_share = ENGINE_SHARE  # the engine's speed while the loop decides a burst
        # drains scaled by how recent ones came out, per group: off by default (session 17's
        # device A/B: 0.68 vs 0.59 within 2x in call 1, 0.57 vs 0.71 in call 2; a wash)
        self.promises = PromiseScale()
        self.promises.enabled = False
        self._elapsed = 0.0  # a decided request's time in the server before its decision
        # a drain's door wait until the door opens, not until it is empty (`_door_wait`):
        # off by default (session 17's device A/B: 0.43 / 0.39 vs 0.71 / 0.57 within 2x)
        self.door_open = False
        self._open_memo: tuple[float, int, float] | None = None
        # the step in progress ends with the door's storm (storm_anchor.py), and a door 429
        # counts down to it, for plain drains and library drains at the door ("door", the
        # default after session 18's device calls: 0.59 vs 0.53 within 2x over 5 servers
        # each, library door 429s 0.60 vs 0.40); "plain", "all", "off" (session 17's)
        self.door_anchor = "door"
        self.clock: Callable[[], float] = time.monotonic  # the promise scale's (tests: virtual)
        self.bookings = Bookings()  # a 429's retry comes back to its appointment (bookings.py)
        self.storm_bound = False  # an overrun's pace lasts the loop's backlog (app: on a GPU)
        self.booked_overdue: float | None = None  # `booked_predict`: None, the overrun again
        self._spacing_memo: dict[RequestCost, tuple[float, float]] = {}  # `gap_s`

    @property
    def load_tps(self) -> float:
        return self._load_tps

    @property
    def slowdown(self) -> float:
        """What predicted steps are scaled by: recent steps' observed over predicted time
        (1: the fit is right as it stands), `deviations` deviations on the slow side. A step that
        runs long delays every request in it, those admitted before it too (on CPU a
        library prefill step ran 5.4 s against 3.7 predicted, and the six plain requests
        sharing it missed), so admission plans for the slow side of recent errors."""
        return self.slow.scale()  # slowdown.py: a lone outlier or post-idle step aside

    # ---------------------------------------------------------------- learning

    def observe_step(self, seconds: float, features: StepFeatures, warmup: bool = False) -> None:
        """Fold one engine loop iteration in. `warmup`: it paid a one-off (a CUDA graph
        capture, a library load) and must not move the estimates."""
        if not seconds > 0 or not math.isfinite(seconds) or features == StepFeatures():
            return
        with self._lock:  # which steps move the factor (a one-off only ends): slowdown.py
            predicted = self.model.step_s(features)
            for slow in (self.slow, self.booked_slow) if predicted > 0 else ():
                slow.observe(seconds / predicted, seconds, features, warmup)
            if not warmup:
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

    def observe_delivery(self, seconds: float) -> None:
        """A first token reached its HTTP handler `seconds` after the engine made it (the
        margin admission plans with, `fits_s`)."""
        self.margin.delivered(seconds)

    def fits_s(self, share: float | None = None) -> float:
        """The predicted TTFT admission accepts: `share` (default `headroom`) x SLO less the
        margin, how long recent first tokens waited for their handler (`ttft_margin`)."""
        if self.ttft_slo is None:
            return math.inf
        return max(0.0, (share or self.headroom) * self.ttft_slo - self.margin.seconds)

    # ---------------------------------------------------------------- prediction

    def step_s(self, features: StepFeatures) -> float:
        """Predicted seconds of a step like `features` now (the fit times `slowdown`)."""
        with self._lock:
            return self.model.step_s(features) * self.slow.scale()

    def predict(
        self,
        new: RequestCost,
        load: Load,
        num_requests: int = 1,
        queue_target: int | None = None,
        overdue: bool = True,
        max_overdue: float = math.inf,
        factor: Slowdown | None = None,
        bound: bool = True,
    ) -> Prediction:
        """Replay the scheduler over `load` plus `num_requests` copies of `new` at the end
        (`queue_replay.replay`) with the learned step times; scaled by how far past its
        prediction the step in progress has already run, if it has. Why: the factor learns
        only from steps that ended, and under a burst the first step ends after admission
        has decided: at 1,000 clients (CPU, a loaded box) the burst's first step ran 1.2 s
        against 0.28 predicted while 103 requests were admitted on the old scale, and the
        steps after ran up to 3x their prediction; most of them missed the SLO. Not for a
        429's drain (`overdue=False`): a drain spans many later steps, which mostly ran as
        the fit said once the burst was answered (scaled, library drains came out 2-4x
        too long). `max_overdue` caps that scale (`booked_overdue`, session 21). `factor`:
        the slowdown factor (default `slow`; a booked retry's own). `bound`: `storm_bound`
        applies (not in the door's `shed`: its drains count down to the step's end)."""
        with self._lock:
            coef = self.model.coef * (factor or self.slow).scale()
            load_tps = self._load_tps

        def run(scale: float) -> Prediction:
            limits, steps, c = self.limits, self.max_sim_steps, coef * scale
            args = (new, load, num_requests, queue_target)
            return replay(*args, coef=c, load_tps=load_tps, limits=limits, max_sim_steps=steps)

        pred = run(1.0)
        if overdue and load.busy_s > pred.first_s > 0:  # the step in progress ran past it
            scaled = run(min(max_overdue, load.busy_s / pred.first_s))
            left = storm_anchor.backlog_left_s(self.door) if self.storm_bound and bound else 0.0
            bounded = storm_anchor.storm_bounded_s(pred.ttft_s, scaled.ttft_s, left)
            pred = scaled._replace(ttft_s=bounded)
        return pred

    def predict_ttft(self, new: RequestCost | int, load: Load, num_requests: int = 1) -> float:
        cost = RequestCost(new) if isinstance(new, int) else new
        return self.predict(cost, load, num_requests).ttft_s

    def decide(
        self,
        new: RequestCost | int,
        load: Load,
        num_requests: int = 1,
        elapsed_s: float = 0.0,
        key: bytes | None = None,
    ) -> Decision:
        """Accept or reject `num_requests` requests like `new` (the n choices and prompts
        of one HTTP request are admitted together). `elapsed_s`: time the request already
        spent in the server before this decision (reading, validating, tokenizing); it
        counts against the SLO and is part of the predicted TTFT. A rejection's
        Retry-After is the predicted time until a request like this would be admitted,
        and with `key` (its route and body, `bookings.current_key`) a booking for then: a
        retry of it comes back to that appointment (bookings.py). The request leaves the
        front door here."""
        self.door.leave_current()
        cost = RequestCost(new) if isinstance(new, int) else new
        booking, early = self.booked(key, elapsed_s)
        if early is not None:  # before its moment: the same appointment, what is left
            return early
        decision = self._decide(cost, load, num_requests, elapsed_s, "learn", booking)
        if booking is not None and decision.verdict is Verdict.SLO:
            self._refused(False, cost, decision, elapsed_s, load)
        if decision.accepted and booking is not None:
            self.bookings.claim(booking)
        elif decision.verdict is Verdict.SLO:  # its place behind the booked, and its own
            decision = decision.later(self.book(key, cost, decision.drain_s) - decision.drain_s)
        self._elapsed += self.alpha * (max(0.0, elapsed_s) - self._elapsed)
        self._check_promises(load)
        with self._lock:
            if decision.accepted:  # what a request inside the door adds if it is admitted
                for i, v in enumerate((cost.prompt_tokens, cost.max_tokens)):
                    self._typical[i] += self.alpha * (v - self._typical[i])
            self.library_requests.observe(cost, BODY_BYTES.get())  # plain ones too: `share`
        return decision

    def _check_promises(self, load: Load) -> None:
        """Would the open promises' requests be admitted on `load` now (PromiseScale.due):
        not while the door sheds (a retry now would meet its 429 first)."""
        now, memo = self.clock(), self._shed_memo
        if memo is not None and memo[2] is not None and time.monotonic() - memo[0] < 0.25:
            return
        if self.ttft_slo is not None and self.promises.enabled:
            wait = self._elapsed  # a retry's too (its body read, tokenized: the loop's lag)
            self.promises.due(now, lambda c: self._decide(c, load, 1, wait, "none").accepted)

    def _decide(
        self,
        cost: RequestCost,
        load: Load,
        num_requests: int,
        elapsed_s: float,
        promise: str = "raw",
        booked: Booking | None = None,
        bound: bool = True,
    ) -> Decision:
        """The verdict on `load` (the engine's, and the door's) plus the booked retries
        that come before this request (`with_bookings`: booked before it arrived and due
        within the SLO's reach; a booked retry, `booked`, at its moment: those booked
        before it). A 429's drain is replayed on the engine's and the door's load alone;
        its place behind the booked retries is `book`'s."""
        real = load
        if booked is not None:
            load = self.with_bookings(real, booked)
        else:
            arrived = self.clock() - max(0.0, elapsed_s)
            load = self.with_bookings(real, horizon_s=self.fits_s(), made_before=arrived)
        queue_full = self.max_queue is not None and real.num_waiting + num_requests > self.max_queue
        target = max(0, (self.max_queue or 0) - num_requests) if queue_full else None
        if booked is not None:  # its step in progress: `booked_predict`
            pred = self.booked_predict(cost, load, num_requests, target)
        else:
            pred = self.predict(cost, load, num_requests, target, bound=bound)
        ttft = pred.ttft_s + max(0.0, elapsed_s)
        if queue_full:
            return Decision(
                Verdict.QUEUE_FULL, ttft, retry_drain.retry_after(pred.queue_s), pred.queue_s
            )
        # (booked retries due within the SLO's reach count: idle then is not idle)
        idle = not load.waiting and not load.running and not self.door.inside
        # An idle server admits: waiting cannot help, and the estimates only learn from
        # work that runs (a prior that errs slow must not lock a request type out). Not
        # with others at the door: a library prefill admitted so at the start of a 1,000
        # burst ran 18 s against 2.5 predicted, its Python attention loop sharing the GIL
        # with the 999 rejections (before session 22's batched CPU attention).
        # A library prefill is the least predictable step (1.5x off under a burst with that
        # loop) and the requests queued before it share that step: it must fit with its
        # error, or they miss for it (risk 1.0 was no better after: docs/admission.md).
        # A booked retry that admission takes only when nothing waits (`pacing`), with
        # nothing waiting before it or at the door, has the moment alone its booking held:
        # admitted if it fits the whole SLO less the delivery margin, or, one whose first
        # token alone misses that, if it is within `hold_slack` of its alone time and its
        # wait so far, plus the margin, on the same (scaled) step times as `ttft` (it
        # misses the SLO by its own length: no wait helps). (The library risk stays for
        # booked retries too: without it, in a virtual three-burst run, plain requests
        # queued before an admitted library prefill shared its steps and 5 of 67 missed
        # the SLO.)
        slo = (self.ttft_slo or math.inf) - self.margin.seconds  # as `fits_s`, no headroom
        if booked is not None and not load.waiting and not self.door.inside:
            idle_only, alone = self.alone(cost)
            if alone > slo:
                own = pred.alone_s + max(0.0, elapsed_s)
                slo = own * (1.0 + self.hold_slack) + self.margin.seconds
            idle = idle or (idle_only and ttft <= slo)
        risk = self.library_risk if cost.library_attend and load.waiting else 1.0
        fits = self.fits_s() if booked is None else self.booked_fits_s(booked)
        if self.ttft_slo is not None and not idle and ttft * risk > fits:
            if promise == "none":  # a check of an open promise: the verdict alone
                return Decision(Verdict.SLO, ttft, 0, 0.0)
            # a booked retry's drain counts the bookings before it, as its verdict did; a
            # new 429's does not: its place behind the booked is `book`'s
            dload = load if booked is not None else real
            drain = self._drain(cost, dload, num_requests, pred if dload is load else None)[1]
            if promise == "learn":  # a request's own 429 (not the door's ask): scaled, kept
                drain = self.promises.promise(group_of(cost, False), cost, drain, self.clock())
            return Decision(Verdict.SLO, ttft, retry_drain.retry_after(drain), drain)
        return Decision(Verdict.ACCEPT, ttft, 0)

    def _drain(
        self,
        cost: RequestCost,
        load: Load,
        num_requests: int = 1,
        pred: Prediction | None = None,
        before_door_s: float = 0.0,
        at_door: bool = False,
    ) -> tuple[int, float]:
        """(Retry-After, drain) for a rejected request like `cost` (`retry_drain.drain_s`):
        the replay over `load` plus the requests inside the door that admission would
        still admit (`pred`, the replay over `load` alone, is reused when none would). A
        retry waits before the door as the rejected one did (`before_door_s`, the event
        loop's lag: at 1,000 clients on CPU at-door promises of ~0 s met 0.4 s reopenings)."""
        assert self.ttft_slo is not None
        fits = self.fits_s()
        typical = self._typical_cost()
        ahead = self._door_ahead(load, fits, typical, cost.library_attend > 0)  # door_early
        if ahead is not load or pred is None or load.busy_s > 0:  # `pred` may be scaled
            pred = self.predict(cost, ahead, num_requests, None, False)
        risk = self.library_risk if cost.library_attend else 1.0
        shared = retry_drain.shared_prefill(pred, cost.prompt_tokens, self.step_s, self.limits)
        with self._lock:  # the slowdown factor: when it falls back (retry_drain.factor_falls)
            slow = self.slow
            fall = FactorFall(slow.log_mean, slow.log_var, slow.alpha, slow.deviations)
        wait = self._door_wait(load, fits, typical) + before_door_s
        drain = drain_s(pred, fits=fits, risk=risk, door_wait_s=wait, shared_s=shared, fall=fall)
        # A step in progress past its prediction: admission (which scales by the overrun,
        # `predict`) rejects until it ends, but this replay has it end now (a 429 promising
        # 0 s in session 13's idle_1000 run). What is left of it: as much as it overran.
        left = 0.0
        if storm_anchor.applies(self.door_anchor, cost.library_attend, at_door):
            left = storm_anchor.storm_left_s(self.door.storm_until)
        drain += storm_anchor.step_delay_s(pred.first_s, load.busy_s, left)
        return retry_drain.retry_after(drain), drain
