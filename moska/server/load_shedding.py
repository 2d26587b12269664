"""Admission at the door: the arrival time of each generation request, and 429s that cost
almost nothing under a burst.

Under a burst of hundreds of clients on one process the front end itself becomes the
queue: reading, validating and tokenizing every body before admission decides took
seconds, which the engine-side prediction never saw, so admitted requests missed the SLO
and rejections were not early. This middleware stamps each generation request's arrival
(`ARRIVAL`, read by `generate.submit`, which charges the time already spent against the
SLO) and, when admission says that even the smallest request would miss the SLO now,
answers 429 before the body is parsed or tokenized. A request it lets in is counted
inside the front door (`front_door.py`) until admission decides on it. A 429's body is only
glanced at (its first chunk, for a `"library"` key): a library request waits several times
longer than a plain one for a retry to be admitted, so it gets the library drain of a
prompt of its size (admission relates Content-Length to library prompts, `BODY_BYTES`).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import replace

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moska.server import storm_anchor
from moska.server.admission import Decision, Verdict
from moska.server.bookings import BODY_DIGEST, BodyDigest
from moska.server.door_backlog import DoorBacklog
from moska.server.errors import error_body
from moska.server.front_door import BODY_BYTES, TICKET, FrontDoor

GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})

# a top-level `"library": "name"` (JSON escapes quotes inside strings, so a prompt cannot
# hold this unescaped)
_LIBRARY = re.compile(rb'"library"\s*:\s*"')

# the most of a refused body the door reads for its booking key (more: no booking)
MAX_DOOR_BODY = 1 << 20

# monotonic time at which the current generation request reached the app (None elsewhere)
ARRIVAL: ContextVar[float | None] = ContextVar("moska_arrival", default=None)


class LoopLag:
    """How late the event loop runs a timer, as a decaying maximum: under a burst the
    loop works through hundreds of connections per iteration, and a request waits about
    that long before its handler (and the arrival stamp) even runs. Admission adds it to
    the time a request has spent, so the wait before the door is not invisible."""

    def __init__(self, interval_s: float = 0.01, decay: float = 0.9) -> None:
        self.interval_s = interval_s
        self.decay = decay
        self.seconds = 0.0
        self.due: float | None = None  # monotonic time the timer should fire next

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            self.due = time.monotonic() + self.interval_s
            await asyncio.sleep(self.interval_s)
            late = max(0.0, loop.time() - t - self.interval_s)
            self.seconds = max(late, self.seconds * self.decay)

    def now(self) -> float:
        """The lag as of now: `seconds`, or how far past due the timer is if more. Why:
        the timer runs on the loop it measures, so during a stall `seconds` still holds
        the last lag seen before it (0.09 s read during a 2 s stall at 1,000 clients,
        1.36 s after it); a handler running in the stall sees the timer overdue."""
        due = self.due
        return self.seconds if due is None else max(self.seconds, time.monotonic() - due)


def elapsed_since_arrival() -> float:
    """Seconds the current request has spent in the server so far (0 outside one)."""
    arrival = ARRIVAL.get()
    return 0.0 if arrival is None else max(0.0, time.monotonic() - arrival)


class LoadSheddingMiddleware:
    """For POST to the generation routes: stamp the arrival, and answer 429 at once when
    `shed()` returns a rejection (it sees the engine's load, not the request)."""

    def __init__(
        self,
        app: ASGIApp,
        shed: Callable[[], Decision | None],
        on_429: Callable[[Decision], None] | None = None,
    ) -> None:
        self.app = app
        self.shed = shed
        self.on_429 = on_429  # each 429 the door answers (a metric)
        self.backlog = DoorBacklog()  # the burst's connections not answered yet

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.backlog.bind(receive)
        self.backlog.active += 1
        try:
            await self._http(scope, receive, send)
        finally:
            self.backlog.active -= 1

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "POST" or scope.get("path") not in GENERATE_PATHS:
            await self.app(scope, receive, send)
            return
        token = ARRIVAL.set(time.monotonic())
        digest = BodyDigest(scope["path"])  # the booking key (bookings.py)
        digest_token = BODY_DIGEST.set(digest)
        try:
            state, door = _state(scope), _front_door(scope)
            waiting, storm, lag = self._storm(state)
            admission = getattr(state, "admission", None)
            if admission is not None:  # booked retries are paced no faster than answered
                admission.front_s = self.backlog.answer_s
            if door is not None:  # those inside are decided after the connections ahead
                door.storm_s = storm  # and its end, if it is a storm (storm_anchor.py)
                door.storm_until = storm_anchor.storm_end(
                    door.storm_until, waiting, storm, time.monotonic(), self.backlog.min_backlog
                )
            decision = self.shed()
            body = b""
            if decision is not None:  # a booked retry at its moment goes in all the same
                body = await _read_body(receive, digest)
                decision = _booked(state, digest.key(), decision)
                if decision is None:
                    receive = _replay(body, receive)
            if decision is None:
                ticket = door.enter() if door is not None else None
                ticket_token = TICKET.set(ticket)
                bytes_token = BODY_BYTES.set(_content_length(scope))
                try:
                    await self.app(scope, _digesting(receive, digest), send)
                finally:
                    BODY_BYTES.reset(bytes_token)
                    TICKET.reset(ticket_token)
                    if door is not None:
                        door.leave(ticket)
                return
            booked = decision.made_at == _EARLY  # an early retry: what is left of its booking
            library = _LIBRARY.search(body[:65536]) is not None
            if not booked and decision.library_drain_s is not None and library:
                decision = decision.for_library(_content_length(scope))
            if not booked:
                decision = decision.aged()  # a memoized one counts down (storm_anchor)
                if getattr(getattr(state, "admission", None), "door_storm", True):
                    decision = decision.later(max(0.0, storm - lag))
                decision = _book(state, digest.key(), decision, library, _content_length(scope))
            if self.on_429 is not None:
                self.on_429(decision)
            self.backlog.answered()
            where = "retry booked" if booked else "server overloaded at the door"
            message = (
                f"{where} ({decision.verdict.value}, predicted time to "
                f"first token {decision.predicted_ttft_s:.2f}s); retry after "
                f"{decision.retry_after_s}s (predicted drain {decision.drain_s:.2f}s); "
                f"{waiting} connections ahead {storm:.2f}s, loop lag {lag:.2f}s"
            )
            body = json.dumps(error_body(429, message, code=decision.verdict.value)).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((k.lower().encode(), v.encode()) for k, v in decision.retry_headers().items()),
            ]
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            BODY_DIGEST.reset(digest_token)
            ARRIVAL.reset(token)

    def _storm(self, state: object | None) -> tuple[int, float, float]:
        """(connections waiting, seconds until the loop has answered them, the loop's lag
        now). A retry sent now is admitted `storm - lag` later than admission's drain says:
        the door reopens once the loop has answered the connections waiting now (until
        then no request inside is decided), and a retry itself waits about the loop's lag
        before it is answered, so it may be sent that much before. At 1,000 clients (CPU)
        a plain probe sent 0.75 s before the last door 429 was admitted."""
        lag = getattr(state, "loop_lag", None)
        waiting = self.backlog.backlog()
        return waiting, waiting * self.backlog.answer_s, lag.now() if lag is not None else 0.0


async def _read_body(receive: Receive, digest: BodyDigest, wait_s: float = 0.5) -> bytes:
    """The body of a request the door refuses, up to `MAX_DOOR_BODY` bytes, fed to
    `digest` (its booking key) and searched for a library name. What has not arrived
    within `wait_s` is left unread (no booking then). No timer when the server says the
    whole body is in (uvicorn's request cycle, `more_body` False: `receive` returns at
    once): a timer was a third of what the door costs a 429 on the loop (22 of 70 us
    in-process, uvloop)."""
    chunks: list[bytes] = []
    size, more = 0, True
    whole = getattr(getattr(receive, "__self__", None), "more_body", True) is False
    try:
        async with asyncio.timeout(None if whole else wait_s):
            while more and size <= MAX_DOOR_BODY:
                message = await receive()
                if message.get("type") != "http.request":
                    break
                chunk, more = message.get("body", b""), bool(message.get("more_body", False))
                chunks.append(chunk)
                size += len(chunk)
                digest.feed(chunk, more)
    except TimeoutError:
        pass
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` with the body the door already read given first (a booked retry let in)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def _digesting(receive: Receive, digest: BodyDigest) -> Receive:
    """`receive` that feeds each body chunk to `digest` as the app reads it."""
    if digest.complete:
        return receive

    async def read() -> Message:
        message = await receive()
        if message.get("type") == "http.request":
            digest.feed(message.get("body", b""), bool(message.get("more_body", False)))
        return message

    return read


# `Decision.made_at` of a booked retry's 429 (early: its booking's time left; at its
# moment: booked again), not to be aged or booked at the door
_EARLY = -1.0


def _booked(state: object | None, key: bytes | None, decision: Decision) -> Decision | None:
    """A door 429 `decision` for a request whose booking key is `key`: None when it is a
    booked retry at or past its moment that admission would take now (it goes in and
    the route decides it as booked), its 429 booked again when admission would not
    (`AdmissionController.booked_at_door`: decided on the booking's cost, before the body
    is parsed or tokenized), the time left of its booking when it came early
    (`AdmissionController.booked`), else `decision` as it is."""
    admission = getattr(state, "admission", None)
    booked = getattr(admission, "booked", None)
    if booked is None or key is None:
        return decision
    lag = getattr(state, "loop_lag", None)  # its wait before the door, as admission counts
    booking, early = booked(key, elapsed_since_arrival() + (lag.now() if lag else 0.0))
    if booking is None:
        return decision
    if early is not None:
        return replace(early, made_at=_EARLY)
    engine = getattr(state, "async_engine", None)
    if engine is None or admission is None:
        return None
    again = admission.booked_at_door(booking, engine.load(), lag.now() if lag else 0.0)
    return None if again is None else replace(again, made_at=_EARLY)


def _book(
    state: object | None, key: bytes | None, decision: Decision, library: bool, size: int | None
) -> Decision:
    """Book the door 429 `decision` (`AdmissionController.book_at_door`; `key` None: its
    place behind the booked retries, not booked); the 429 then promises that moment,
    which may be later than the memoized drain."""
    book = getattr(getattr(state, "admission", None), "book_at_door", None)
    if book is None or decision.verdict is not Verdict.SLO:
        return decision
    drain = book(key, decision.drain_s, library, size)
    return decision if drain == decision.drain_s else decision.later(drain - decision.drain_s)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _state(scope: Scope) -> object | None:
    """The server state of the app serving `scope` (None for a bare app)."""
    return getattr(getattr(scope.get("app"), "state", None), "moska", None)


def _front_door(scope: Scope) -> FrontDoor | None:
    """The admission's front door of the app serving `scope` (None for a bare app)."""
    return getattr(getattr(_state(scope), "admission", None), "door", None)
