"""Admission's answer to one request (`Decision`: accept, or a 429 with its predicted
drain as `Retry-After` and `retry-after-ms`), apart from the controller (admission.py)."""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from moska.server import retry_drain


class Verdict(enum.Enum):
    ACCEPT = "accept"
    QUEUE_FULL = "queue_full"
    SLO = "ttft_slo"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    predicted_ttft_s: float
    retry_after_s: int  # whole seconds a client should wait before retrying; 0 if accepted
    drain_s: float = 0.0  # predicted seconds until a request like this one would be admitted
    # at the door (body unread): the drain of a typical library request, for a 429 whose
    # body turns out to name a library (None: no library request decided yet), and of one
    # whose body has so many bytes
    library_drain_s: float | None = None
    library_drain_of: Callable[[int], float] | None = None
    # monotonic time of the drain's prediction when a memoized door rejection counts down
    # to its moment (`aged`; storm_anchor.py), None: each 429 gets the drain as predicted
    made_at: float | None = None

    @property
    def accepted(self) -> bool:
        return self.verdict is Verdict.ACCEPT

    @property
    def retry_after_ms(self) -> int:
        """The drain in milliseconds, for OpenAI's `retry-after-ms` header (its clients
        prefer it to `Retry-After`, whose whole seconds, at least 1 per HTTP, cannot say
        0.4 s): at least 1 (a client reads 0 as "no hint")."""
        if not math.isfinite(self.drain_s):
            return 3_600_000
        return max(1, round(self.drain_s * 1000))

    def for_library(self, body_bytes: int | None = None) -> Decision:
        """This door rejection as a library request (of `body_bytes`) gets it."""
        drain = self.library_drain_s
        if body_bytes and self.library_drain_of is not None:
            drain = self.library_drain_of(body_bytes)
        if drain is None:
            return self
        return replace(self, retry_after_s=retry_drain.retry_after(drain), drain_s=drain)

    def aged(self, now: float | None = None) -> Decision:
        """This rejection as of `now` when it counts down (`made_at` set): a drain predicted
        earlier ends at the same moment, so it is shorter by the time since (at least 1 ms).
        Why: the door's decision is memoized for up to `shed_ttl_s` and served to every 429
        of that window (storm_anchor.py)."""
        if self.made_at is None or not math.isfinite(self.drain_s):
            return self
        now = time.monotonic() if now is None else now
        drain = max(0.001, self.drain_s - max(0.0, now - self.made_at))
        return replace(self, retry_after_s=retry_drain.retry_after(drain), drain_s=drain)

    def later(self, seconds: float) -> Decision:
        """This rejection with `seconds` more before a retry would be admitted."""
        if not seconds > 0:
            return self
        drain = self.drain_s + seconds
        return replace(self, retry_after_s=retry_drain.retry_after(drain), drain_s=drain)

    def retry_headers(self) -> dict[str, str]:
        """The 429's `Retry-After` (whole seconds) and `retry-after-ms`."""
        return {"Retry-After": str(self.retry_after_s), "retry-after-ms": str(self.retry_after_ms)}
