"""The front door's part of a 429's drain, apart from the controller (admission.py): how
long a retry waits for the door, the library drains by body size, and how many of those
inside admission will admit ahead of a retry (`burst_admits`). A mixin of
`AdmissionController`: it reads the controller's state (`door`, `predict`, `_drain`, the
slowdown factor, the memos)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from moska.server import retry_drain
from moska.server.burst_admits import Backlog, burst_admits
from moska.server.door_early import door_ahead, library_admits
from moska.server.queue_replay import Load, RequestCost


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

    def fits_s(self) -> float:
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
