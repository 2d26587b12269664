"""The controller's side of retry bookings (bookings.py), apart from admission.py: the load
a verdict counts with the booked retries still to come, the steady gap between booked
retries, a 429's booking (its promise no sooner than its place in the queue), and a booked
retry decided at the door before its body is parsed (`booked_at_door`). A mixin of
`AdmissionController`: it reads the controller's `bookings`, `clock`, `predict`, `fits_s`,
`library_requests` and typical cost."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from moska.server import retry_drain, storm_anchor
from moska.server.admission_decision import Decision, Verdict
from moska.server.bookings import Booking, Bookings
from moska.server.queue_replay import Load, Prediction, RequestCost, replay
from moska.server.step_model import StepFeatures


class BookedDrains:
    """`AdmissionController`'s bookings (see the module docstring)."""

    ttft_slo: float | None
    bookings: Bookings
    clock: Callable[[], float]
    predict: Any
    booked_overdue: float | None
    library_requests: Any
    _lock: Any
    model: Any
    limits: Any
    max_sim_steps: int
    _load_tps: float
    _spacing_memo: dict[RequestCost, tuple[float, float]]  # `gap_s`: (when, engine gap)
    headroom: float
    door: Any  # front_door.FrontDoor
    slow: Any  # slowdown.Slowdown
    booked_slow: Any  # slowdown.Slowdown: a booked retry's factor (`booked_predict`)
    fits_s: Callable[..., float]  # admission.AdmissionController

    # the event loop's wall time per answer under a backlog (DoorBacklog.answer_s, set by
    # the door at each request): booked retries come no closer than `front_answers` of it.
    # 32: in loop CPU an admitted, streamed request costs 33x a door 429 and a route 429
    # 5.6x (load_door_cost, 2-core box). At 8 (session 20) a GPU server's first storm
    # began at pace 1 and its promises were short (session 21's device call 1: a
    # 1,000-client burst at pace 1 kept 0.34 of its sampled promises; one that began at
    # the pace 3.4 its 300-client burst had learnt kept 0.97, i.e. 8 x 3.4 = 27 answers);
    # the pace (up to 8x more) is there for a loop slower than that
    front_s: float = 0.0
    front_answers: float = 32.0
    # an idle-only booking holds the engine for its replayed first token and decode times
    # this much more: at exactly the replay, the next one's moment came while it still ran
    # about half the time (the step times' own noise)
    hold_slack: float = 0.1
    # the share of the SLO a booked retry is admitted within from its moment on (None:
    # admission's `headroom`, as a new request): `booked_fits_s`. An A/B, off: 0.925 did
    # not hold up (docs/admission.md, session 24: CPU plain 1,000 bursts 0.87-1.00 within
    # 2x with it, 0.81-1.00 without, retries' SLO down to 0.948 with it; GPU 300 bursts
    # 0.64-1.00 either way)
    booked_headroom: float | None = None
    # a retry is early or on time by when it was sent, not when it is decided (`booked`):
    # an A/B, off. Why: on the GPU the 300-client bursts' misses were dry retries sent at
    # half their promise that waited for the loop until past 0.75 of it (session 24)
    booked_by_send: bool = False
    # booked moments spaced by the replayed gap times the booked retries' own factor
    # (`booked_slow`, which judges them at their moment), not the fit alone (`gap_s`); the
    # server's default: `spaced_by_default` (session 25)
    space_by_booked: bool = False
    _typical_cost: Callable[[], RequestCost]  # admission_door.DoorDrains
    _decide: Callable[..., Decision]  # admission.AdmissionController
    _elapsed: float  # its moving average of the wait before a decision

    def with_bookings(
        self,
        load: Load,
        before: Booking | None = None,
        horizon_s: float = math.inf,
        made_before: float = math.inf,
    ) -> Load:
        """`load` plus booked retries still to come (`Bookings.ahead`): for a verdict,
        those booked before the request arrived and due within `horizon_s` (FIFO: a retry
        that comes later than its first token does not delay it), or, `before`, those
        booked before a booked retry being decided (its own place in the queue)."""
        if self.ttft_slo is None:
            return load
        now = self.clock()
        booked = tuple(self.bookings.ahead(now, before, now + horizon_s, made_before))
        if not booked:
            return load
        n = len(booked)
        return Load(load.waiting + booked, load.running, load.num_pending + n, load.busy_s)

    def booked_fits_s(self, booking: Booking) -> float:
        """The predicted TTFT a booked retry is admitted within: from its moment on
        (`booking.due`, where a client that obeys `retry-after-ms` comes) `booked_headroom`
        x SLO less the delivery margin; in the early window before it (`Bookings.opens`,
        for clients that read the rounded `Retry-After`) a new request's (`fits_s`). Why
        not the early window too: on the GPU the 300-client bursts' dry retries at half
        the promise, which reached the door in that window (requests waited up to 1.1-1.5 s
        for the event loop there), were admitted so and scored "long": 12 of 96 sampled at
        0.925 against 7 of 122 at 0.85 (session 24)."""
        # "from its moment": a client timed by `retry-after-ms` (rounded to the ms; asyncio
        # wakes a timer up to its clock's resolution early) may come a hair before it
        early = self.clock() < booking.due - 0.05 * (booking.due - booking.made) - 0.005
        return self.fits_s(None if early else self.booked_headroom)

    def booked_predict(
        self, cost: RequestCost, load: Load, num_requests: int, target: int | None
    ) -> Prediction:
        """A booked retry's replay at its moment, on its own slowdown factor
        (`booked_slow`: a step after the engine rested, the storm's first, and a decode
        tail over the fit do not raise it), and a step in progress past its prediction ends
        as much again later as it has overrun so far (`storm_anchor.step_delay_s` without
        a storm, as a 429's drain charges it), not every step after scaled by its overrun
        as a new request's replay is (`predict`). Why: it comes back after the storm it was
        refused in, and its queue is prefill steps, which ran at 0.8-1.2x the fit in
        session 23's first CPU burst; the factor was 1.5-2.6 there (that burst's first
        step, 2.5-5.5x, after a 0.06-0.25 s rest; or the warm-up's library decode tail at
        1.4-2.3x), and a retry that came back during the first step had its whole replay
        scaled by its overrun (to 4.4-9.8 s, as on the GPU in session 21, device call 4):
        refused at their moment at 2.9-9.8 s predicted, where first tokens came in 1-2 s.
        New requests keep the cautious factor: with this for all, twice as many were taken
        in the 300 and 1,000 bursts, TTFT p99 3.8-5.1 s, SLO 0.94 in one 300 burst.
        `booked_overdue` set: session 21's form (the main factor, overrun scale capped)."""
        if self.booked_overdue is not None:
            return self.predict(cost, load, num_requests, target, max_overdue=self.booked_overdue)
        pred = self.predict(cost, load, num_requests, target, False, factor=self.booked_slow)
        late = storm_anchor.step_delay_s(pred.first_s, load.busy_s, 0.0)
        return pred._replace(ttft_s=pred.ttft_s + late) if late > 0 else pred

    def booked(
        self, key: bytes | None, waited_s: float = 0.0
    ) -> tuple[Booking | None, Decision | None]:
        """The booking of the request whose key is `key` and, when this retry of it is
        early, its 429: the time left of the same appointment (`Bookings.check`). With
        `booked_by_send`, early or on time by when it was sent: `waited_s` (its time in the
        server, the loop's lag included) before now."""
        now = self.clock()
        at = now - max(0.0, waited_s) if self.booked_by_send else now
        booking, left = self.bookings.check(key, at)
        if booking is None or left is None:
            return booking, None
        left = max(0.0, booking.due - now)  # from now, not from its send
        return booking, Decision(Verdict.SLO, left, retry_drain.retry_after(left), left)

    def _replay(self, cost: RequestCost, ahead: int) -> Prediction:
        """`cost` behind `ahead` more like it, on the fitted step times unscaled."""
        with self._lock:
            coef, load_tps = self.model.coef.copy(), self._load_tps
        load, limits, steps = Load((cost,) * ahead), self.limits, self.max_sim_steps
        return replay(
            cost, load, 1, None, coef=coef, load_tps=load_tps, limits=limits, max_sim_steps=steps
        )

    def pacing(self, cost: RequestCost) -> tuple[float, bool, float]:
        """(gap, idle only, alone) of booked retries like `cost`. `gap`: `gap_s`. `idle
        only`: its own first token alone misses `headroom` x SLO, so admission takes it
        only when nothing waits (a library prefill on CPU); against the SLO's steady share,
        not `fits_s`: its delivery margin balloons in a storm (to seconds at 1,000 clients
        on 2 cores), and every plain request read as idle-only there went unbooked.
        `alone`: that first token's seconds (`alone`)."""
        idle_only, alone = self.alone(cost)
        return self.gap_s(cost), idle_only, alone

    def alone(self, cost: RequestCost) -> tuple[bool, float]:
        """(idle only, alone) of `pacing`: a replay of `cost` alone (~25 us)."""
        alone = float(self._replay(cost, 0).alone_s)
        return alone > self.headroom * (self.ttft_slo or math.inf), alone

    def decode_tail_s(self, cost: RequestCost) -> float:
        """The rest of `cost` after its first token, decoding alone: an idle-only booking
        holds the engine through it (in a virtual 300-client run, the next one's moment
        came while it still decoded, and 20 of 25 first retries refused were so)."""
        with self._lock:  # the fit alone, as the replays here (no slowdown factor)
            step = self.model.step_s(StepFeatures(0, cost.library_attend, 1, 0))
        return max(0.0, step) * max(0, cost.max_tokens - 1)

    def gap_s(self, cost: RequestCost) -> float:
        """How much later each of a batch more requests like `cost` gets its first token
        behind a full batch (a staircase: a batch's requests start together), replayed on
        the fitted step times without the slowdown factor (a booked retry comes after the
        burst that inflates it: scaled, promises made in a 1,000-client storm on 2 cores
        spaced plain retries 0.92 s apart and the engine sat idle as they came back); and
        no closer than the front end answers them, `front_answers` x the event loop's time
        per answer (on the GPU the engine's gap is ~ms and a 1,000-client burst's booked
        retries came back faster than the one event loop answered them, 0.5-2 s late, most
        refused again at their moment). The replays (~1 ms) are memoized for a second per
        cost rounded up to an eighth of an octave (`_bucket`): memoized by the exact cost,
        nearly every route 429 (each its own prompt length) replayed them again."""
        now, key = self.clock(), _bucket(cost)
        hit = self._spacing_memo.get(key)
        if hit is not None and now - hit[0] < 1.0:
            engine = hit[1]
        else:
            n = self.limits.max_num_seqs
            engine = max(0.0, (self._replay(key, 2 * n).ttft_s - self._replay(key, n).ttft_s) / n)
            if len(self._spacing_memo) > 256:
                self._spacing_memo.clear()
            self._spacing_memo[key] = (now, engine)
        if self.space_by_booked:
            with self._lock:
                engine *= self.booked_slow.scale()
        return max(engine, self.front_answers * self.front_s)

    def book(self, key: bytes | None, cost: RequestCost, drain_s: float) -> float:
        """The promise of a 429 whose own drain is `drain_s`: no sooner than its place
        behind the booked retries still to come (`Bookings.book`, paced by `pacing`),
        booked under `key` (None, or a bench probe: promised, not booked). A request
        admission takes only when nothing waits (its first token alone misses the
        headroom) holds the engine alone for that first token: it comes a typical gap
        after the booked queue, and the bookings after it come after its first token.
        Such requests were left unbooked before session 20 (a queue that keeps the engine
        busy never gives them a moment alone): on the device's bursts 30 % of the library
        requests were so and none of them got in within two retries. Its hold is its
        replayed first token and decode (`decode_tail_s`), plus `hold_slack`. One whose
        first token alone misses the whole SLO is booked so too (session 21; before, it
        was promised its own drain, unbooked, and the booked queue kept the engine busy at
        every moment: 14-19 of ~70 library clients a virtual burst never got in): it is
        served at its moment, missing the SLO by its own length (no wait helps it)."""
        if self.ttft_slo is None or not self.bookings.enabled or not math.isfinite(drain_s):
            return drain_s
        gap, idle_only, alone = self.pacing(cost)
        now, book = self.clock(), self.bookings.book
        if not idle_only:
            return book(key, now, drain_s, cost, gap)
        # behind the booking before it by more than the grace a late client has, so that
        # one is not still counted as waiting at its moment
        gap = self.gap_s(self._typical_cost()) + self.bookings.grace_s
        hold = (alone + self.decode_tail_s(cost)) * (1.0 + self.hold_slack)
        return book(key, now, drain_s, cost, gap, hold_s=hold)

    def booked_at_door(
        self, booking: Booking, load: Load, elapsed_s: float = 0.0
    ) -> Decision | None:
        """A booked retry at its moment, at the door: None when admission would take it
        now (it goes in and the route decides it), else its 429, booked again (its own
        drain). Decided on the booking's cost before the body is parsed or tokenized: on
        the device's 1,000-client bursts the retries refused again at their moment took
        the route's whole path (validation, tokenization) and the loop answered ~120 of
        them a second. A door 429's booking holds the door's guess of its cost (a typical
        request, or a typical library one of its body's size), as the door's own verdicts
        do; one the door lets in is decided again in the route on its real cost. One
        refused for anything but the SLO goes in (the route says why). The wait before the
        door counts at least the usual wait before a decision, as the route would."""
        wait = max(elapsed_s, self._elapsed)
        decision = self._decide(booking.cost, load, 1, wait, "learn", booking)
        if decision.accepted or decision.verdict is not Verdict.SLO:
            return None
        self._refused(True, booking.cost, decision, wait, load)
        promise = self.book(booking.key, booking.cost, decision.drain_s)
        if self.bookings.find(booking.key, self.clock()) is booking:  # not booked again
            self.bookings.came(booking)
        return decision.later(promise - decision.drain_s)

    def _refused(
        self, at_door: bool, cost: RequestCost, decision: Decision, wait_s: float, load: Load
    ) -> None:
        """Record a booked retry refused at its moment (`Bookings.refused`), not a bench
        probe's. The step's prediction unscaled (scaled, it comes out as the step so far)."""
        if not self.bookings.recording():
            return
        # the step's own prediction only when a step is in progress (another replay on the
        # door's path otherwise spent for nothing)
        first = self.predict(cost, load, overdue=False).first_s if load.busy_s > 0 else 0.0
        self.bookings.refused(
            at_door, cost.library_attend > 0, float(decision.predicted_ttft_s), wait_s,
            load.num_waiting, load.num_running, self.door.inside,
            [load.busy_s, first, self.slow.scale()],
        )  # fmt: skip

    def book_at_door(
        self, key: bytes | None, drain_s: float, library: bool, body_bytes: int | None
    ) -> float:
        """`book` a door 429 as a typical request, or a typical library request of
        `body_bytes` when its body names a library."""
        with self._lock:
            cost = self.library_requests.cost(body_bytes) if library else None
        return self.book(key, cost or self._typical_cost(), drain_s)


def _bucket(cost: RequestCost) -> RequestCost:
    """`cost` with its prompt and output lengths rounded up to an eighth of an octave
    (exact up to 16): the costs `gap_s` memoizes its replays for."""

    def up(n: int) -> int:
        step = 1 << max(0, n.bit_length() - 4)
        return -(-n // step) * step

    return RequestCost(
        up(cost.prompt_tokens), up(cost.max_tokens), cost.library_attend, cost.library_load_tokens
    )


def spaced_by_default(engine: Any) -> bool:
    """Whether `space_by_booked` is on for `engine`: on a CPU engine, off on a GPU one.
    Measured on CPU only (docs/admission.md, session 25): plain bursts, 3 runs per arm
    alternating, off 1.00 / 0.73 / 0.69 within 2x at 300 clients (their booked retries
    spaced 0.11 s apart by the fit, refused at their moment while 256 plain rows decoded
    at 1.2-1.4x the fit), on 1.00 in every burst of 5 runs; the library mix 0.98-1.00 on.
    A GPU engine's bursts met the target without it and it did not run there (no device
    time left), so the GPU keeps what was measured. An engine without `device` counts as
    a CPU one."""
    return not storm_anchor.bound_by_default(engine)
