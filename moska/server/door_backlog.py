"""The burst still arriving: connections the server has accepted but not answered, and how
long the event loop takes to answer them (a door 429's promise waits for them).

Why: at a burst of 1,000 streaming clients (CPU, `moska bench load`) the door's plain 429s
promised 0.24 s where a retry was admitted only after 1.38 s (7% within 2x): no request past
the door was decided from 2.0 s to 3.97 s while the loop answered ~950 door 429s. A request
inside the door needs several loop iterations (body, validation, tokenization, admission),
and each iteration first answers every connection that became readable, so the door reopens
only once the burst's connections are answered; a retry sent before then waits behind them
too. The admission side cannot see them (they have no request yet) and the loop-lag timer,
on the same loop, reads only after the fact. uvicorn can: its `ServerState.connections`
holds every accepted connection, and one that has not had a request parsed (`cycle` None)
is still to be answered, as is a request task (`ServerState.tasks`) that has not reached
the app yet. Sampled from a thread during a 1,000-request burst of door 429s: the burst
was accepted (kernel accept queue < 70) 0.2 s before its first request was parsed, so the
count sees the burst before its first 429.

`storm_s` = that count (less the door 429s answered since it was taken) x the loop's wall
time per door 429, measured while a backlog waited (a moving average; on this 2-core box
0.3 ms of CPU each (load_door_cost), 0.75-2 ms of wall as other processes load it).
Not yet shown to help: over 13 bursts of 1,000 on a box loaded to 1-7 the plain door 429s
were within 2x for 54% with it and 54% without (scored on the same 429s), since a retry
sent during the storm was in some runs answered only after it, when the door had opened
(`moska bench load --door-storm off` runs without it; to be re-run on an idle box).
On the device's 16 idle cores (session 16) it hurt: plain door 429s were within 2x for 0.70
with it and 0.78 without (18,964 429s, every run not worse without): probes sent during
the storm were admitted once the loop reached them, so a retry waits the storm out in the
server. Off by default since (`AdmissionController.door_storm`); the count still sets the
door's stall (`FrontDoor.storm_s`).
"""

from __future__ import annotations

import math
import time
from typing import Any


def server_state(receive: Any) -> Any | None:
    """uvicorn's `ServerState` behind an ASGI `receive` (its request cycle's `receive`;
    the cycle's `on_response` is its protocol's method, and the protocol holds the server
    state), or None under another server or a wrapped `receive`."""
    cycle = getattr(receive, "__self__", None)
    protocol = getattr(getattr(cycle, "on_response", None), "__self__", None)
    state = getattr(protocol, "server_state", None)
    has = hasattr(state, "connections") and hasattr(state, "tasks")
    return state if has else None


def unanswered(state: Any, active: int) -> int:
    """Connections of `state` not answered yet: accepted with no request parsed, plus
    request tasks not done beyond the `active` requests the app is handling. Not done:
    a loop iteration can answer hundreds of requests, and their tasks leave the set and
    their connections close only in the next (`len(tasks)` stood at 867 while the loop
    answered 800 of them)."""
    fresh = sum(1 for p in list(state.connections) if getattr(p, "cycle", 0) is None)
    pending = sum(1 for t in list(state.tasks) if not t.done())
    return fresh + max(0, pending - active)


class DoorBacklog:
    """Counts requests inside the app (`active`, kept by the load-shedding middleware) and
    estimates the time until the loop has answered what is waiting (`storm_s`).

    The time per answer (session 16) is the storm's loop time over its answers so far (a
    ratio of sums, with the last storm's rate as a prior worth `prior_answers` answers):
    the moving average of each window's own ratio (`rate = "mean"`, kept for A/B) let one
    window with a pause in it (8 answers in a 0.25 s GIL stall) set 7.4 ms per answer on
    the device's idle cores, where that storm's 743 connections were answered in 0.22 s:
    door 429s promised 5-7.8 s for a 0.4-0.7 s drain (625 of 784 outside 2x).

    `count`: a callable giving the unanswered connections (None until the middleware
    binds uvicorn's state, or on another server: then `storm_s` is 0). Recounted at most
    every `recount_s` (a count walks every connection); between counts each door 429
    answered takes one off. Not thread-safe: used on the event loop only."""

    rate = "sums"  # or "mean", the moving average of window ratios before session 16
    prior_answers = 16

    def __init__(
        self,
        prior_answer_s: float = 0.001,
        tau_s: float = 0.25,
        recount_s: float = 0.02,
        min_backlog: int = 16,
        clock: Any = time.monotonic,
    ) -> None:
        self.answer_s = prior_answer_s  # loop wall time per door 429 under a backlog
        self.tau_s = tau_s  # the moving average's time constant
        self.recount_s = recount_s
        self.min_backlog = min_backlog
        self.clock = clock
        self.active = 0
        self.count: Any = None
        self._state: Any = None
        self._counted = 0  # the last count
        self._counted_at = -1e9
        self._answered = 0  # door 429s answered since it
        self._prior_s = prior_answer_s  # the last storm's time per answer
        self._storm = [0.0, 0]  # this storm's loop time and answers (windows with a backlog)

    def bind(self, receive: Any) -> None:
        """Find uvicorn's state behind `receive` (once; later calls are no-ops)."""
        if self.count is None:
            state = server_state(receive)
            if state is not None:
                self._state = state
                self.count = lambda: unanswered(state, self.active)

    def answered(self) -> None:
        """A door 429 went out."""
        self._answered += 1

    def backlog(self) -> int:
        """Connections still to be answered now (0 when not countable). A recount also
        learns the wall time per answer: answers since the last count over the time
        between, when that count saw a backlog (the loop was answering the burst)."""
        if self.count is None:
            return 0
        now = self.clock()
        if now - self._counted_at < self.recount_s:
            return max(0, self._counted - self._answered)
        count = self.count()
        if self.rate == "sums":
            self._learn_sums(now, count)
        # a sample only when a backlog waited from that count to this one: the loop was
        # answering it all along (not idle between sparse 429s)
        elif self._counted >= self.min_backlog and count > 0 and self._answered >= 8:
            # weighted by the time it spans: one 20 ms window with a pause in it (a GC, the
            # engine thread holding the GIL) put 2.1 ms where the storm ran at 0.9 ms
            dt = now - self._counted_at
            weight = 1.0 - math.exp(-dt / self.tau_s)
            self.answer_s += weight * (dt / self._answered - self.answer_s)
        self._counted, self._counted_at, self._answered = count, now, 0
        return count

    def _learn_sums(self, now: float, count: int) -> None:
        """Fold the window since the last count into the storm's sums (when a backlog
        waited all through it); a storm over (fewer than `min_backlog` waiting) leaves its
        rate as the next one's prior."""
        storm = self._storm
        if self._counted >= self.min_backlog and count > 0 and self._answered > 0:
            storm[0] += now - self._counted_at
            storm[1] += self._answered
            if storm[1] >= 8:
                k = self.prior_answers
                self.answer_s = (k * self._prior_s + storm[0]) / (k + storm[1])
        elif count < self.min_backlog and storm[1]:
            self._prior_s, self._storm = self.answer_s, [0.0, 0]

    def storm_s(self) -> float:
        """Seconds until the loop has answered the connections waiting now."""
        return self.backlog() * self.answer_s
