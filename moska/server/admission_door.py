"""The front door's 429 (`shed`) and its part of a 429's drain, apart from the controller
(admission.py): how long a retry waits for the door, the library drains by body size, and
how many of those inside admission will admit ahead of a retry (`burst_admits`). A mixin of
`AdmissionController`: it reads the controller's state (`door`, `predict`, `_drain`, the
slowdown factor, the memos)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from moska.server import retry_drain
from moska.server.admission_decision import Decision, Verdict
from moska.server.admission_promises import group_of
from moska.server.burst_admits import Backlog, burst_admits
from moska.server.door_early import door_ahead, door_probe, library_admits
from moska.server.queue_replay import Load, RequestCost
from moska.server.retry_drain import with_door


class DoorDrains:
    """`AdmissionController`'s door drains (see the module docstring)."""

    door: Any
    predict: Any
    library_requests: Any
    slow: Any
    engine_share: float
    shed_ttl_s: float
    door_open: bool
    _typical: list[float]
    library_risk: float
    # door_early.py (session 18, A/B): the library requests admitted ahead count in a
    # drain, and the door refuses on arrival what would be refused after its wait
    door_library: bool = False
    door_early: bool = False
    door_all: bool = False  # the early door's probe: behind all inside (A/B, door_early.py)
    _lock: Any
    _door_memo: tuple[float, int, int, int] | None
    _open_memo: tuple[float, int, float] | None
    _lib_memo: tuple[Any, int] | None = None
    ttft_slo: float | None
    max_queue: int | None
    _shed_memo: tuple[float, int, Decision | None] | None
    door_lag: bool
    promises: Any
    bookings: Any
    door_anchor: str
    clock: Callable[[], float]

    def _decide(
        self,
        cost: RequestCost,
        load: Load,
        num_requests: int,
        elapsed_s: float,
        promise: str = "raw",
        booked: Any = None,
        bound: bool = True,
    ) -> Decision:
        raise NotImplementedError

    def _check_promises(self, load: Load) -> None:
        raise NotImplementedError

    with_bookings: Callable[..., Load]  # admission_bookings.BookedDrains

    def _drain(
        self,
        cost: RequestCost,
        load: Load,
        num_requests: int = 1,
        pred: Any = None,
        before_door_s: float = 0.0,
        at_door: bool = False,
    ) -> tuple[int, float]:
        raise NotImplementedError

    def fits_s(self, share: float | None = None) -> float:
        raise NotImplementedError

    def _typical_cost(self) -> RequestCost:
        """A typical admitted request (the controller's moving averages)."""
        with self._lock:
            return RequestCost(*(max(1, round(v)) for v in self._typical))

    def _door_wait(self, load: Load, fits: float, typical: RequestCost) -> float:
        """Until the door lets a retry in (`retry_drain.door_opens_s`; `door_open` False:
        until it is empty, as before session 17), memoized like `_door_admits`."""
        inside, memo, now = self.door.inside, self._open_memo, time.monotonic()
        if not self.door_open or not inside:
            return self.door.wait_s
        if memo is None or now - memo[0] >= self.shed_ttl_s or abs(inside - memo[1]) >= 4:
            args = (self.predict, typical, load, inside, fits, self.door.gap_s)
            memo = self._open_memo = (now, inside, retry_drain.door_opens_s(*args))
        return memo[2]

    def _library_drains(self, load: Load, before_door_s: float) -> Callable[[int], float]:
        """The drain of a library request at the door by its body's bytes, on `load`
        (one replay per 16-token prompt step, kept with the door's memoized decision)."""
        memo: dict[RequestCost, float] = {}

        def drain(body_bytes: int) -> float:
            with self._lock:
                cost = self.library_requests.cost(body_bytes)
            assert cost is not None  # made only once a library request was decided
            if cost not in memo:
                memo[cost] = self._drain(cost, load, before_door_s=before_door_s, at_door=True)[1]
            return memo[cost]

        return drain

    def _door_admits(self, load: Load, fits: float) -> int:
        """`burst_admits` (admission's decisions on those inside, replayed), memoized like
        `shed` (while the count inside and the engine's queue stay about the same): a
        burst's hundreds of 429s cost a few replays."""
        now, inside, door = time.monotonic(), self.door.inside, self.door
        memo = self._door_memo
        if (
            memo is not None
            and now - memo[0] < self.shed_ttl_s
            and abs(inside - memo[1]) < 4
            and memo[2] == load.num_waiting
        ):
            return min(memo[3], inside)
        stall = door.stall_s()  # those inside are decided after it, their time counts
        plain = inside - round(inside * self.library_requests.share)  # door_admits: why
        with self._lock:  # the step that serves them may be the burst's first, after a gap
            s = self.slow
            first = s.cold() / s.scale() if s.cold_pending(load.busy_s) else 1.0
        backlog = Backlog(inside, door.gap_s, stall, door.storm_s)
        typical, share = self._typical_cost(), self.engine_share
        admitted = burst_admits(self.predict, typical, load, plain, backlog, fits, first, share)
        self._door_memo = (now, inside, load.num_waiting, admitted)
        return admitted

    def _door_ahead(
        self, load: Load, fits: float, typical: RequestCost, library: bool = True
    ) -> Load:
        """`load` plus those inside the door admission will admit ahead of a retry: the
        plain ones (`_door_admits`) and, with `door_library` and `library` (a library
        request's drain, or the early door's probe), the library ones
        (`door_early.library_admits`), memoized with the plain count. Not in plain drains:
        on session 18's door-mode device bursts (1,343 plain door 429s) any time added to
        their promises lowered the admission-map bracket (300 clients: 0.63-0.66 as
        recorded, 0.58-0.64 with 0.15 s more; 1,000: 0.40-0.41, 0.29-0.32)."""
        admitted = self._door_admits(load, fits)
        if not (self.door_library and library) or not self.door.inside:  # the default
            return door_ahead(load, typical, admitted, None, 0)
        with self._lock:
            lib, share = self.library_requests.cost(), self.library_requests.share
        if lib is None:
            return door_ahead(load, typical, admitted, None, 0)
        memo = self._door_memo
        key = (memo[0], memo[1], memo[2], memo[3]) if memo is not None else None
        if key is None or self._lib_memo is None or self._lib_memo[0] != key:
            inside = round(self.door.inside * share)
            stall = self.door.stall_s()
            n = library_admits(
                self.predict, lib, typical, load, admitted, inside, share, fits,
                self.library_risk, stall,
            )  # fmt: skip
            self._lib_memo = (key, n)
        return door_ahead(load, typical, admitted, lib, self._lib_memo[1])

    def shed(self, load: Load, elapsed_s: float = 0.0) -> Decision | None:
        """The rejection that the smallest request (one prompt token) would get now, or
        None: when even it would miss the SLO, the front end answers 429 before reading a
        body. `elapsed_s`: what a request waits before the door now (the event loop's
        lag). The requests inside the front door are ahead of it: they count as engine
        work (each like a typical admitted plain one) and as a wait. Its drain is a typical
        admitted request's, and `library_drain_s` a typical library request's (the door
        tells them apart by the body). Memoized for `shed_ttl_s` (while the count inside
        grows by fewer than 4), so a burst costs few predictions."""
        if self.ttft_slo is None and self.max_queue is None:
            return None
        now, inside = time.monotonic(), self.door.inside
        with self._lock:
            cached = self._shed_memo
            lib = self.library_requests.cost()
        typical = self._typical_cost()
        if (
            cached is not None
            and now - cached[0] < self.shed_ttl_s
            and (cached[2] is not None or inside < cached[1] + 4)
        ):
            return cached[2]
        ahead = with_door(load, typical, inside)  # door_early: a typical one, after the storm,
        if self.door_early and not self.door_all:  # behind those admission will admit
            ahead = self._door_ahead(load, self.fits_s(), typical)
        door = self.door
        probe, wait = door_probe(self.door_early, typical, elapsed_s, door.wait_s, door.storm_s)
        # the overrun's scale to the step's end, bounded or not (`storm_bound`): this 429's
        # drain counts down to that end (storm_anchor.step_delay_s); bounded, the door
        # reopened before it (GPU 300 burst, session 24: 5 of 23 door promises "long")
        decision = self._decide(probe, ahead, 1, wait, bound=False)
        elapsed_s *= self.door_lag  # in the drains only with `door_lag` (A/B: bench load)
        result, learn = None, self.promises
        if not decision.accepted:
            result = decision
            if decision.verdict is Verdict.SLO:  # the drain of a typical request, each kind
                drain = self._drain(typical, load, before_door_s=elapsed_s, at_door=True)[1]
                drain = learn.promise(group_of(typical, True), typical, drain, self.clock())
                result = replace(
                    decision, retry_after_s=retry_drain.retry_after(drain), drain_s=drain
                )
                if lib is not None:
                    raw = self._drain(lib, load, before_door_s=elapsed_s, at_door=True)[1]
                    each, f = (
                        self._library_drains(load, elapsed_s),
                        learn.factor("library_door", self.clock()),
                    )
                    result = replace(
                        result,
                        library_drain_s=learn.promise("library_door", lib, raw, self.clock()),
                        library_drain_of=lambda body_bytes: f * each(body_bytes),
                    )
        if result is not None and self.door_anchor != "off":  # each 429 counts down
            result = replace(result, made_at=now)
        with self._lock:
            self._shed_memo = (now, inside, result)
        if result is None:  # the door is open: would the open promises' requests get in
            self._check_promises(load)
        return result
