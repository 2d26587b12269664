"""One decode instance's time-per-output-token factor: observed token times over what its
step fit predicts (`GlobalScheduler.tpot_factor`, #19).

The step fit misses the engine loop's work between steps, the HTTP hops and a host busier
than when it was fitted, so the front end scales the fit by what it sees in the streams it
relays (4-token windows, `token_times.TokenTimes`). Two memories make that factor:

- the recent one: a ratio of decaying sums of the windows (each older window counts 0.8x,
  and all fade with FAST_HALF_LIFE_S), which follows the decode side within a burst;
- the long-run one: an upper quantile (LONG_QUANTILE) of the windows of the last
  LONG_HORIZON_S, fading toward 1 with LONG_HALF_LIFE_S. What the decode side has been
  known to be at its slow end lately.

The factor is their mix weighted by the recent memory's (decayed) window count against
PRIOR_WINDOWS: with many recent windows it is the recent ratio; after an idle gap, or at a
burst's start, it is the long-run upper quantile. It used to fade to 1 with the recent
memory alone (half-life 5 s): the CPU trace bench's next burst came after a ~15 s gap (the
other system's round), found the factor back at ~1 (0.015-0.037 s per token predicted),
admitted 8 requests at once, and they saw 0.16-0.21 s. Fading toward 1 is kept, only
slower (LONG_HALF_LIFE_S), so that a long run of TPOT rejections, which brings no new
windows, still ends.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

FAST_HALF_LIFE_S = 5.0
FAST_KEEP = 0.8  # the weight of the previous windows at each new one
LONG_HALF_LIFE_S = 30.0  # the rounds of the CPU trace bench come ~15 s apart
LONG_HORIZON_S = 120.0  # windows older than this leave the long-run memory
LONG_WINDOWS = 64  # at most this many windows in it (a trace round gives ~60)
LONG_QUANTILE = 90.0
PRIOR_WINDOWS = 1.0  # the long-run value counts as this many recent windows


def _fade(value: float, seconds: float, half_life_s: float) -> float:
    """`value` moved toward 1 after `seconds` with half-life `half_life_s`."""
    return 1.0 + (value - 1.0) * 0.5 ** (max(0.0, seconds) / half_life_s)


class TpotFactor:
    """Observed over predicted time per output token of one decode instance."""

    def __init__(self, floor: float, ceiling: float) -> None:
        self.floor, self.ceiling = floor, ceiling
        self._obs = self._pred = self._n = 0.0  # the recent memory's decaying sums
        self._at: float | None = None  # the last window's time
        self._windows: deque[tuple[float, float]] = deque(maxlen=LONG_WINDOWS)  # (at, ratio)
        self._high = 1.0  # the long-run quantile, as of _at

    def value(self, now: float) -> float:
        """The factor at `now` (1 before any window)."""
        if self._at is None:
            return 1.0
        dt = now - self._at
        n = self._n * 0.5 ** (max(0.0, dt) / FAST_HALF_LIFE_S)
        recent = min(self.ceiling, max(self.floor, self._obs / self._pred))
        prior = _fade(self._high, dt, LONG_HALF_LIFE_S)
        return (n * recent + PRIOR_WINDOWS * prior) / (n + PRIOR_WINDOWS)

    def observe(self, observed_s: float, predicted_s: float, now: float) -> None:
        """A window of tokens took `observed_s` where the uncorrected step fit said
        `predicted_s`."""
        if not (observed_s > 0 and predicted_s > 0 and math.isfinite(observed_s)):
            return
        keep = 0.0
        if self._at is not None:
            keep = FAST_KEEP * 0.5 ** (max(0.0, now - self._at) / FAST_HALF_LIFE_S)
        # a ratio of decaying sums, not a mean of ratios (a window's jitter would bias it)
        self._obs = keep * self._obs + observed_s
        self._pred = keep * self._pred + predicted_s
        self._n = keep * self._n + 1.0
        ratio = min(self.ceiling, max(self.floor, observed_s / predicted_s))
        self._windows.append((now, ratio))
        while self._windows and now - self._windows[0][0] > LONG_HORIZON_S:
            self._windows.popleft()
        faded = [_fade(r, now - at, LONG_HALF_LIFE_S) for at, r in self._windows]
        self._high = float(np.percentile(faded, LONG_QUANTILE))
        self._at = now
