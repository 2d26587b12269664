"""Token times of a stream the front end relays from a decode instance, for the global
scheduler's time-per-output-token correction (`GlobalScheduler.observe_tpot`)."""

from __future__ import annotations

import time

WINDOW = 4  # tokens per report: a slower host shows within a few tokens, not at the end


class TokenTimes:
    """A relayed stream's output tokens after its first, in windows of WINDOW tokens: their
    seconds, and what the step model (at the decode batch of each moment) predicted."""

    def __init__(self) -> None:
        self.count, self.observed_s, self.predicted_s = 0, 0.0, 0.0
        self._last: float | None = None

    def add(self, chunk: bytes, step_s: float) -> tuple[float, float] | None:
        """Count a relayed chunk; every WINDOW tokens, (observed s, predicted s) of the
        window that ended."""
        n = chunk.count(b'"finish_reason"')  # one per token event (not usage, not [DONE])
        if n == 0:
            return None
        now = time.monotonic()
        last, self._last = self._last, now
        if last is None:
            return None
        self.count += n
        self.observed_s += now - last
        self.predicted_s += n * step_s
        if self.count < WINDOW:
            return None
        window = (self.observed_s, self.predicted_s)
        self.count, self.observed_s, self.predicted_s = 0, 0.0, 0.0
        return window
