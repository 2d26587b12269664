"""Retry bookings: a 429's promise kept. A refused request is booked for the moment its
`retry-after-ms` names; a retry of the same request (the same route and body bytes, as the
OpenAI SDK re-sends it) before that moment is refused with what is left of the same
appointment, and one at or after it is decided as any request, but with only the
bookings due before its own counted ahead of it. A 429 is promised no sooner than a
steady gap after the latest booked moment (`book`), and a new request's verdict counts
the retries booked before it arrived and due within the SLO's reach (`ahead`): the
refused requests of a burst form a queue instead of racing each other back.

Why (issue #15.4, docs/admission.md): "Retry-After is the predicted drain within 2x", the
drain of a 429 being when a retry of that request would be admitted. Without bookings
that moment depends on who else comes back first, and on session 18's device bursts a
promise that knew each burst's own future (the hindsight ceiling, load_drain_ceiling)
scored only 0.78-0.91 within 2x: no prediction can meet 0.95 when admission itself is a
race. A booking makes the moment the server's commitment.

Clients that never come back would otherwise hold capacity: the queue counts only as much
as booked requests have come back (`show_rate`: of recent bookings, the share whose client
came back at its moment, admitted or refused again; by the booking's try, since a client
stops after its own retry limit: the OpenAI SDK's third 429 of a request is its last,
and on session 20's device bursts those lapses alone took one show rate for all from 1
to 0.03, the booked queue then counted as empty and 150 retries admitted together missed
the SLO by 11 s), and a booking lapses `lapse_factor` x its promise after its moment (at
least `min_lapse_s`). Thread-safe; the clock is the caller's (admission's).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import threading
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

from moska.server.queue_replay import RequestCost


class BodyDigest:
    """A digest of one request's route and body bytes, fed as the body is read."""

    __slots__ = ("_h", "complete")

    def __init__(self, path: str) -> None:
        self._h = hashlib.blake2b(path.encode(), digest_size=16)
        self.complete = False  # the whole body went through `feed`

    def feed(self, chunk: bytes, more_body: bool) -> None:
        self._h.update(chunk)
        self.complete = not more_body

    def key(self) -> bytes | None:
        """The booking key, None until the whole body was read."""
        return self._h.digest() if self.complete else None


# the current generation request's body digest (set by the load-shedding middleware)
BODY_DIGEST: ContextVar[BodyDigest | None] = ContextVar("moska_body_digest", default=None)


def current_key() -> bytes | None:
    """The booking key of the request being handled (None outside one, or body unread)."""
    digest = BODY_DIGEST.get()
    return None if digest is None else digest.key()


@dataclass
class Booking:
    key: bytes
    made: float  # when the 429 was answered (the caller's clock)
    due: float  # the moment its retry-after-ms names
    cost: RequestCost
    lapse: float = math.inf  # after this an unclaimed booking is dropped
    opens: float = -math.inf  # from this a retry is taken as at its moment (`early_share`)
    tries: int = 1  # the 429s of this request so far (1: its first)
    origin: float = 0.0  # when its first 429 was answered (`book` sets it)
    first_s: float = 0.0  # what that first 429 promised


@dataclass
class BookingCounts:
    """Totals since start (`moska_retry_bookings_total` in /metrics)."""

    made: int = 0
    claimed: int = 0  # a retry at or after its moment was admitted
    early: int = 0  # a retry came before its moment (answered with what is left)
    lapsed: int = 0  # never claimed
    rebooked: int = 0  # a retry at its moment was refused again (a later booking)


@dataclass
class Bookings:
    """The booked 429s by key (see the module docstring)."""

    enabled: bool = True
    # lapse at 3x the wait from the 429: at 2x the bench's dry retry at 2x (timed from
    # when its client received the 429) came just after the lapse
    lapse_factor: float = 2.0
    min_lapse_s: float = 2.0
    grace_s: float = 0.25  # a booking counts ahead until this long past its moment
    # a retry this share of its wait early is taken as on time: a client that reads the
    # whole seconds of `Retry-After` (rounded, so up to 0.5 s short) is not turned away
    # from a wait of 2 s or more; one at half its wait still is. 0.4 let dry half-retries
    # in at 1,000 clients on 2 cores: the bench's client received its 429s ~0.2 s after
    # the server booked them, which is 0.3 of a 0.68 s promise
    early_share: float = 0.25
    # per try (1, 2, 3 or more), the share of the last 256 bookings whose client came back
    # (`_outcomes`), with a prior of `show_prior` that did (every client returns until seen
    # otherwise)
    show_prior: int = 8
    max_bookings: int = 100_000
    # the gap between booked moments is the replayed one times `pace`: up by `pace_step`
    # at each booked retry refused at its moment (the engine serves them slower than the
    # replay says), back down a nineteenth of that at each claimed one (a pace that holds
    # when ~1 in 19 is refused; a quarter, until session 21, settled at 1 in 5 refused and
    # gave up the pace a storm had learnt before the next storm), within [1, max_pace]
    # by kind (plain, library: `_kind`): on the device's CPU cores library retries refused
    # at their moment took one pace to its cap and spaced the plain ones 8x too
    paces: dict[bool, float] = field(default_factory=lambda: {False: 1.0, True: 1.0})
    pace_step: float = 0.1
    max_pace: float = 8.0
    # a booked retry refused at its moment is booked again no later than this many times
    # its first promise from its first 429 (its own drain permitting), instead of behind
    # every booking (None: behind them all; an A/B, off); see `book`
    rebook_within: float | None = None
    # whether the request being decided books and claims (the bench's dry probes do not)
    recording: Callable[[], bool] = lambda: True
    counts: BookingCounts = field(default_factory=BookingCounts)
    _by_key: dict[bytes, Booking] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _outcomes: dict[int, deque[bool]] = field(
        default_factory=lambda: {t: deque(maxlen=256) for t in (1, 2, 3)}
    )
    _last_due: float = -math.inf  # the latest booked moment
    _lapses: list[tuple[float, int, Booking]] = field(default_factory=list)  # heap by lapse
    # the latest booked retries refused at their moment, why (`refused`; `state`)
    _refusals: deque[list[float]] = field(default_factory=lambda: deque(maxlen=32))
    _refused_n: int = 0
    _seq: int = 0  # ties in the heap

    def find(self, key: bytes | None, now: float) -> Booking | None:
        """The live booking of `key` (None: none, off, or no key)."""
        if key is None or not self.enabled:
            return None
        with self._lock:
            self._expire(now)
            return self._by_key.get(key)

    def book(
        self,
        key: bytes | None,
        now: float,
        drain_s: float,
        cost: RequestCost,
        spacing_s: float = 0.0,
        hold_s: float = 0.0,
    ) -> float:
        """The promise of a 429 whose own drain is `drain_s`, and no sooner than its place
        in the queue of booked retries still to come: `spacing_s` (times the learnt
        `pace` and the share of booked clients who come back, `show_rate`) after the latest
        booked moment. (Session 19 scaled the whole queue by the show rate instead: at a
        rate of 0.97 a door drain 2.2 s away then outweighed the queue, and on the device
        718 of 804 door 429s of a 1,000-client burst were given the same 0.1 s.) A booked
        retry refused at its moment goes behind the queue too (until session 21 it kept
        its place, promised its own drain, and came back into the moments of the bookings
        after it), and the pace of its kind slows; with `rebook_within` x, no later than x
        times its first promise from its first 429 unless its own drain is later (an A/B,
        off: behind the whole queue of a 1,000-client CPU burst, its client's dry retry at
        twice the first promise met its new booking early and that promise scored short,
        but capped, the engine was still full then; no clear gain, session 25). `hold_s`:
        how long it holds the engine alone from its moment (a request admission takes only
        when nothing waits): later bookings come after that, times the pace of its kind. Booked under `key` for
        `now` + the promise unless `key` is None, bookings are off, or the request is a
        bench probe (`recording`); the promise either way."""
        if not self.enabled or not math.isfinite(drain_s):
            return drain_s
        drain_s = own = max(0.0, drain_s)
        with self._lock:
            self._expire(now)
            recording = key is not None and self.recording()
            old = self._by_key.get(key) if recording and key is not None else None
            tail = self._last_due
            if tail > now:  # behind the booked retries still to come
                step = spacing_s * self.paces[_kind(cost)] * self.show_rate
                drain_s = max(drain_s, tail - now + step)
            if old is not None and self.rebook_within is not None:
                limit = old.origin + self.rebook_within * old.first_s - now
                drain_s = min(drain_s, max(own, limit))
            if not recording:
                return drain_s
            assert key is not None
            lapse = now + drain_s + max(self.min_lapse_s, self.lapse_factor * drain_s)
            tries = 1
            if old is not None:  # its client came back: a show
                tries = old.tries + 1
                self._outcome(old, True)
                self.counts.rebooked += 1
                k = _kind(cost)
                self.paces[k] = min(self.max_pace, self.paces[k] * (1.0 + self.pace_step))
            elif len(self._by_key) >= self.max_bookings:
                return drain_s  # full: this 429 is a plain promise
            else:
                self.counts.made += 1
            due = now + drain_s
            opens = now + (1.0 - self.early_share) * drain_s
            origin, first = (now, drain_s) if old is None else (old.origin, old.first_s)
            booking = Booking(key, now, due, cost, lapse, opens, tries, origin, first)
            self._by_key[key] = booking
            self._seq += 1
            heapq.heappush(self._lapses, (lapse, self._seq, booking))
            self._last_due = max(self._last_due, due + max(0.0, hold_s) * self.paces[_kind(cost)])
        return drain_s

    def check(self, key: bytes | None, now: float) -> tuple[Booking | None, float | None]:
        """The live booking of `key` and, when a retry of it comes before the booking
        opens, the time left until its moment (counted `early`); None, None: no booking."""
        booking = self.find(key, now)
        if booking is None or now >= booking.opens:
            return booking, None
        with self._lock:
            self.counts.early += 1
        return booking, booking.due - now

    def claim(self, booking: Booking) -> None:
        """A retry of `booking` was admitted: it is spent."""
        if not self.recording():
            return
        with self._lock:
            if self._spend(booking):
                self.counts.claimed += 1
                k = _kind(booking.cost)
                self.paces[k] = max(1.0, self.paces[k] * (1.0 - self.pace_step / 19))

    def came(self, booking: Booking) -> None:
        """The client of `booking` came back at its moment and was answered without a new
        booking (the queue full, or no moment can keep its promise): a show, and spent."""
        if not self.recording():
            return
        with self._lock:
            self._spend(booking)

    def ahead(
        self,
        now: float,
        before: Booking | None = None,
        due_by: float = math.inf,
        made_before: float = math.inf,
    ) -> list[RequestCost]:
        """The booked work still to come: of the bookings not more than `grace_s` past
        their moment, due by `due_by` and made before `made_before` (or, with `before`, a
        booked retry being decided: due no later than its own), the earliest `show_rate`
        share, by try (`show_rate_of`: as many as are expected to come back)."""
        if not self.enabled:
            return []
        with self._lock:
            self._expire(now)
            due = [
                b
                for b in self._by_key.values()
                if now - self.grace_s <= b.due <= due_by
                and b.made < made_before
                and b is not before
                and (before is None or b.due <= before.due)
            ]
            rates = {t: self.show_rate_of(t) for t in self._outcomes}
            expected = sum(rates[min(b.tries, 3)] for b in due)
        due.sort(key=lambda b: b.due)
        return [b.cost for b in due[: round(expected)]]

    @property
    def pace(self) -> float:
        """The slower kind's pace (`moska_retry_bookings_pace`)."""
        return max(self.paces.values())

    @property
    def show_rate(self) -> float:
        """The share of clients that came back to their first booking (recent window)."""
        return self.show_rate_of(1)

    def show_rate_of(self, tries: int) -> float:
        """The share of bookings made at a request's `tries`-th 429 (3: or later) whose
        client came back at its moment (claimed or refused again) rather than lapsing."""
        seen = self._outcomes[min(max(tries, 1), 3)]
        return (sum(seen) + self.show_prior) / (len(seen) + self.show_prior)

    def _spend(self, booking: Booking) -> bool:
        """Drop `booking` as shown (its client came back), unless it was spent or replaced
        already. Under the lock."""
        if self._by_key.get(booking.key) is not booking:
            return False
        del self._by_key[booking.key]
        self._outcome(booking, True)
        return True

    def _outcome(self, booking: Booking, came: bool) -> None:
        self._outcomes[min(booking.tries, 3)].append(came)

    def refused(self, at_door: bool, library: bool, ttft_s: float, wait_s: float,
                waiting: int, running: int, inside: int, extra: list[float]) -> None:  # fmt: skip
        """A booked retry refused at its moment: where (door / route), its kind, its
        predicted first token, the wait before its decision that counted, the engine's
        waiting and running, the requests inside the front door, and `extra` (the
        step in progress so far, its predicted time, the slowdown factor), after a
        running number (diagnostics: `state` gives the latest 32, the bench records them
        with each burst; the number tells a burst's own from those before it)."""
        row = [float(at_door), float(library), round(ttft_s, 3), round(wait_s, 3)]
        with self._lock:
            self._refused_n += 1
            row = [float(self._refused_n), *row, float(waiting), float(running), float(inside)]
            self._refusals.append(row + [round(float(x), 4) for x in extra])

    def state(self) -> dict[str, float | list[float]]:
        """The totals by outcome, the bookings open, the show rate and the pace."""
        with self._lock:
            return {**vars(self.counts), "open": len(self), "show_rate": self.show_rate,
                    "show_rate_by_try": [self.show_rate_of(t) for t in (1, 2, 3)],
                    "pace": self.pace, "pace_library": self.paces[True],
                    # [number, at door, library, ttft, wait, waiting, running, inside,
                    # busy, first, slowdown] each
                    "refused_latest": [x for r in self._refusals for x in r]}  # fmt: skip

    def __len__(self) -> int:
        return len(self._by_key)

    def _expire(self, now: float) -> None:
        """Drop lapsed bookings (each a no-show: the show rate falls). Under the lock; a
        heap of lapse times, so a call costs O(log n) per lapsed booking, not a scan."""
        heap = self._lapses
        while heap and heap[0][0] < now:
            _, _, booking = heapq.heappop(heap)
            if self._by_key.get(booking.key) is booking:  # not claimed or replaced since
                del self._by_key[booking.key]
                self.counts.lapsed += 1
                self._outcome(booking, False)


def _kind(cost: RequestCost) -> bool:
    """The pace a booking of `cost` keeps: library requests' apart from plain ones."""
    return cost.library_attend > 0
