"""`moska bench load`'s drain probes, answered without being run: what "admission reopened"
means for a 429's promise.

A 429's `Retry-After` promises when a retry of the same request would be admitted. The
bench measures that with probes (load_client._probe): one body per kind and prompt length,
re-sent every `probe_interval_s` after the burst's first 429. An admitted probe used to run:
on CPU a library probe's prefill takes seconds, so every probe still waiting was then
measured behind another probe's work, which no 429 had been promised against (session 13:
a 96-character library probe reopened after the 160- and 244-character ones, 11.4 s
against 7.7 s). Here a request sent with `PROBE_HEADER` is decided by admission as any
other, and one it admits is answered at once with a 429 whose Retry-After is `DRY_ADMITTED`
(a real 429 says at least 1) instead of being handed to the engine: the reopening is seen,
and nothing the bench adds changes what comes after it.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Any

from moska.server.admission import AdmissionController, Decision, Verdict
from moska.server.queue_replay import Load, RequestCost

PROBE_HEADER = "X-Moska-Bench-Probe"
DRY_ADMITTED = "0"  # the Retry-After of a probe admission admitted (not run)

# whether the HTTP request being handled is a drain probe (set by `ProbeTag`)
PROBE: ContextVar[bool] = ContextVar("moska_bench_probe", default=False)

_HEADER = PROBE_HEADER.lower().encode()


class ProbeTag:
    """ASGI wrapper around the bench's server app: marks requests sent with
    `PROBE_HEADER` (`PROBE`) for `DryProbeAdmission`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        probe = scope["type"] == "http" and any(k == _HEADER for k, _ in scope.get("headers", ()))
        token = PROBE.set(probe)
        try:
            await self.app(scope, receive, send)
        finally:
            PROBE.reset(token)


class DryProbeAdmission(AdmissionController):
    """The controller; a probe it admits is turned into a 429 whose Retry-After is
    `DRY_ADMITTED` (so the engine never sees it), kept in `dry_admitted` (when, predicted
    TTFT). For benches only. A probe is the bench's instrument, not traffic: it leaves the
    429s the promise scale learns from (`admission_promises`) and the
    mix of decided requests (`LibraryRequests.share`) as they were (5 of 6 probe kinds name a
    library, and the long ones are re-sent every 0.25 s until admitted: after the warm-up
    the share read 0.9+ for a 50/50 burst, and the door counted none inside as admitted)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dry_admitted: list[tuple[float, float]] = []
        self.bookings.recording = lambda: not PROBE.get()  # a probe books and claims nothing

    def shed(self, load: Load, elapsed_s: float = 0.0) -> Decision | None:
        self.promises.recording = not PROBE.get()  # a probe's door 429s are not learnt from
        try:
            return super().shed(load, elapsed_s)
        finally:
            self.promises.recording = True

    def decide(
        self,
        new: RequestCost | int,
        load: Load,
        num_requests: int = 1,
        elapsed_s: float = 0.0,
        key: bytes | None = None,
    ) -> Decision:
        lib = self.library_requests
        mix = (list(lib.kinds), lib.share) if PROBE.get() else None
        self.promises.recording = not PROBE.get()  # nor the 429s it learns from
        try:
            d = super().decide(new, load, num_requests, elapsed_s, key)
        finally:
            self.promises.recording = True
        if mix is not None:
            with self._lock:
                lib.kinds.clear()
                lib.kinds.extend(mix[0])
                lib.share = mix[1]
        if not (d.accepted and PROBE.get()):
            return d
        self.dry_admitted.append((time.monotonic(), d.predicted_ttft_s))
        return Decision(Verdict.SLO, d.predicted_ttft_s, int(DRY_ADMITTED), 0.0)
