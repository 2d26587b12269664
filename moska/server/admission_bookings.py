"""The controller's side of retry bookings (bookings.py), apart from admission.py: the load
a verdict or a drain counts with the booked retries still to come, the gap between
bookings made from one memoized door drain, and a door 429's booking. A mixin of
`AdmissionController`: it reads the controller's `bookings`, `clock`, `predict`, `fits_s`,
`library_requests` and typical cost."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from moska.server.bookings import Booking, Bookings
from moska.server.queue_replay import Load, RequestCost
from moska.server.retry_drain import with_door


class BookedDrains:
    """`AdmissionController`'s bookings (see the module docstring)."""

    ttft_slo: float | None
    bookings: Bookings
    clock: Callable[[], float]
    predict: Any
    library_requests: Any
    _lock: Any
    # the gap between bookings of one memoized door drain: (plain, library), set by `shed`
    _door_spacing: tuple[float, float] = (0.0, 0.0)

    _typical_cost: Callable[[], RequestCost]  # admission_door.DoorDrains

    def with_bookings(
        self,
        load: Load,
        before: Booking | None = None,
        horizon_s: float = math.inf,
        made_before: float = math.inf,
    ) -> Load:
        """`load` plus booked retries still to come (`Bookings.ahead`): all of them for a
        429's drain (it is booked behind them); for a verdict, those booked before the
        request arrived and due within `horizon_s` (FIFO: a retry that comes later than
        its first token does not delay it), or, `before`, those booked before a booked
        retry being decided (its own place in the queue)."""
        if self.ttft_slo is None:
            return load
        now = self.clock()
        booked = tuple(self.bookings.ahead(now, before, now + horizon_s, made_before))
        if not booked:
            return load
        n = len(booked)
        return Load(load.waiting + booked, load.running, load.num_pending + n, load.busy_s)

    def spacing_s(self, cost: RequestCost, load: Load, k: int = 8) -> float:
        """How much later each of `k` more requests like `cost` queued behind `load` gets
        its first token (two replays): the gap between bookings made from one memoized
        door drain (`Bookings.book`), which would otherwise all be due at once."""
        base = self.predict(cost, load, 1, None, False).ttft_s
        more = self.predict(cost, with_door(load, cost, k), 1, None, False).ttft_s
        return max(0.0, (more - base) / k)

    def book_at_door(
        self, key: bytes, drain_s: float, library: bool, body_bytes: int | None
    ) -> float:
        """Book a door 429 (`bookings.py`) as a typical request, or a typical library
        request of `body_bytes` when its body names a library; the drain booked."""
        with self._lock:
            cost = self.library_requests.cost(body_bytes) if library else None
        spacing = self._door_spacing[1 if cost is not None else 0]
        return float(
            self.bookings.book(key, self.clock(), drain_s, cost or self._typical_cost(), spacing)
        )
