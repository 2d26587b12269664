"""The front end's own queue: generation requests past the door (their arrival stamped,
not shed) that admission has not decided yet.

Why: at 1,000 clients at once every request passed the door while the engine was still
idle (the door asks "would the smallest request miss the SLO now?"), and then each one's
body was read, validated and tokenized before admission saw it: decisions came 2.5-5.5 s
after arrival and most admitted requests missed the SLO. Counting the requests inside lets
the door shed with that backlog in view, and says how long a retry would queue behind it
(Retry-After). Requests leave at their admission decision (`leave_current`, called by the
controller) or, whatever happens to them, when the middleware is done with them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextvars import ContextVar


class Ticket:
    """One request inside the front door."""

    __slots__ = ("at", "left")

    def __init__(self, at: float = 0.0) -> None:
        self.at = at  # when it entered (monotonic)
        self.left = False


# the current request's ticket (set by the load-shedding middleware)
TICKET: ContextVar[Ticket | None] = ContextVar("moska_door_ticket", default=None)
# the current request's body size in bytes (its Content-Length; None when not sent), set by
# the load-shedding middleware: admission relates library requests' prompts to it
BODY_BYTES: ContextVar[int | None] = ContextVar("moska_body_bytes", default=None)


class FrontDoor:
    """A count of the requests inside and the front end's time per request under a
    backlog (a moving average of the gaps between decisions while others waited).
    Thread-safe."""

    def __init__(
        self, prior_gap_s: float = 0.005, alpha: float = 0.2, min_backlog: int = 2
    ) -> None:
        self.inside = 0
        # a gap is learnt only with at least this many inside. 32 (session 21, so that a
        # warm-up wave's gaps, many decisions to a loop iteration, could not let a fresh GPU
        # server's first 1,000 storm through the door whole, as in device call 2) lowered
        # the local fresh 1,000 burst's sampled promises within 2x from 1.00 / 1.00 (two
        # runs at 2) to 0.85 / 0.95: kept at 2 (someone waiting behind it) until measured
        self.min_backlog = min_backlog
        self.gap_s = prior_gap_s
        self.alpha = alpha
        self._last_leave: float | None = None
        self._busy_since = 0.0  # when the door last went from empty to occupied
        # seconds until the event loop has answered the connections waiting (set by the
        # load-shedding middleware, door_backlog.py): no one inside is decided before
        self.storm_s = 0.0
        self.storm_until = 0.0  # monotonic time at which they will have been (storm_anchor)
        self._tickets: deque[Ticket] = deque()  # in entry order; those left are dropped lazily
        self._lock = threading.Lock()

    def enter(self) -> Ticket:
        ticket = Ticket(time.monotonic())
        with self._lock:
            if self.inside == 0:
                self._busy_since = ticket.at
            self.inside += 1
            self._tickets.append(ticket)
            while self._tickets[0].left:  # bounded by the requests inside
                self._tickets.popleft()
        return ticket

    def leave(self, ticket: Ticket | None) -> None:
        """`ticket` leaves (once; later calls are no-ops)."""
        if ticket is None or ticket.left:
            return
        now = time.monotonic()
        with self._lock:
            ticket.left = True
            backlog = self.inside >= self.min_backlog  # others behind it: a service time
            self.inside = max(0, self.inside - 1)
            # a gap is a service time only between two leaves of one busy period: the first
            # leave of a burst measured the idle time since the last burst (capped at 1 s,
            # it put the gap at 0.2 s and a plain retry's drain at 3 s against 0.9 s seen)
            last = self._last_leave
            if backlog and last is not None and last >= self._busy_since:
                gap = min(now - last, 1.0)
                self.gap_s += self.alpha * (gap - self.gap_s)
            self._last_leave = now

    def leave_current(self) -> None:
        self.leave(TICKET.get())

    def stall_s(self) -> float:
        """How long the requests inside will have been inside when decided: the oldest
        one's time so far plus `storm_s` (0 with no one inside). Their time counts against
        the SLO, so at 1,000 clients (CPU) admission took 7 of the 54 inside after a 1 s
        storm, where the door's drains had counted them all as admitted ahead."""
        with self._lock:
            while self._tickets and self._tickets[0].left:
                self._tickets.popleft()
            if not self._tickets:
                return 0.0
            oldest = self._tickets[0].at
        return max(0.0, time.monotonic() - oldest) + self.storm_s

    @property
    def wait_s(self) -> float:
        """How long a request arriving now would queue behind the ones inside."""
        return self.inside * self.gap_s
