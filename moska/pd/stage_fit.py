"""A stage's seconds as a line in what the step fits say: `seconds ≈ a + b·x`, learnt from
each finished request at once (#19).

The front end predicts two stages of a request's time to first token: admission -> KV at
the decode instance (x: the step-fit seconds of the prefill work ahead on the chosen prefill
instance, its own prefill and the transfer) and decode request -> first token (x: the step
fit of the decode step it joins). The intercept `a` is what a request pays whatever the
work (HTTP hops, tokenizing, the event loops: on the CPU trace bench ~0.1-0.3 s, 5-10x the
tiny model's compute); the slope `b` is how much slower than its fit the instance's work
really runs. They used to be one ratio, observed over predicted with the queue included,
multiplying the whole stage (`GlobalScheduler.slowdown`): on a 2-core host the fixed part
dominated, the ratio reached 4-22x and, multiplying the queue too, rejected whole rounds of
requests; and it was >= 1 by construction, so it only learnt pessimism.

Ridge least squares over decaying sums: each new observation keeps KEEP of the old
weights, and all fade with HALF_LIFE_S, so that a run of rejections (no new observations)
brings the fit back to the prior a0 + b0·x (the step fit is right, nothing on top). The
residuals' spread (the same decaying weights) gives `upper`, the prediction plus `z`
deviations: predictions are means, and on a shared host a request admitted at the edge
misses about half the time. Only the residuals above the line count (a stage shorter
than predicted widens no margin).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

KEEP = 0.9  # an observation's weight after each newer one (~10 observations in memory)
HALF_LIFE_S = 10.0  # and after this many seconds without any
# the prior's weights (ridge): on the slope, worth two observations 0.1 s of x apart, so
# that observations all at one x (no queue yet) move the intercept more than the slope; on
# the intercept, a third of one (a fit without news for a minute is near the prior)
PRIOR_SLOPE_WEIGHT = 2 * 0.1**2
PRIOR_INTERCEPT_WEIGHT = 0.3
# the work never runs faster than its instances' own step fits say: a fit learnt at low
# load (x small, the fixed part dominant) put the slope at ~0.8 and a burst's queue (x
# 0.3-0.5 s) was then predicted at 0.27-0.42 s where it took 1.2 s (slope ~2.4)
MIN_SLOPE = 1.0
MAX_SLOPE = 30.0
# what `fixed_s` reads: a fit's last this many excesses over its step-fit seconds
FIXED_MEMORY = 32


class StageFit:
    """seconds ≈ a + b·x for one stage, from (x, seconds) pairs as they come."""

    def __init__(self, a0: float = 0.0, b0: float = 1.0) -> None:
        self.a0, self.b0 = a0, b0
        self._s = [0.0] * 5  # decaying sums of w, w·x, w·y, w·x², w·x·y
        self._sq = 0.0  # decaying sums of w·residual² and of w (the residual's memory)
        self._w = 0.0
        self._at: float | None = None  # the last observation's time
        self.count = 0  # observations ever learnt (undecayed)
        # seconds - b0·x of the last FIXED_MEMORY observations (`fixed_s`)
        self._excess: deque[float] = deque(maxlen=FIXED_MEMORY)

    def _fade(self, now: float) -> float:
        return 1.0 if self._at is None else 0.5 ** (max(0.0, now - self._at) / HALF_LIFE_S)

    def coef(self, now: float) -> tuple[float, float]:
        """(a, b) at `now`: ridge least squares of the decayed observations, the slope held
        toward b0 (PRIOR_SLOPE_WEIGHT) and the intercept, weakly, toward a0."""
        f = self._fade(now)
        w, sx, sy, sxx, sxy = (v * f for v in self._s)
        la, lb = PRIOR_INTERCEPT_WEIGHT, PRIOR_SLOPE_WEIGHT
        m00, m01, m11 = w + la, sx, sxx + lb
        r0, r1 = sy + la * self.a0, sxy + lb * self.b0
        det = m00 * m11 - m01 * m01
        a, b = (m11 * r0 - m01 * r1) / det, (m00 * r1 - m01 * r0) / det
        if not MIN_SLOPE <= b <= MAX_SLOPE:  # at the bound, the intercept for it
            b = min(MAX_SLOPE, max(MIN_SLOPE, b))
            a = (r0 - m01 * b) / m00
        if a < 0:  # no negative fixed time: the line through the origin instead
            a, b = 0.0, min(MAX_SLOPE, max(MIN_SLOPE, r1 / m11))
        return a, b

    def predict(self, x: float, now: float) -> float:
        a, b = self.coef(now)
        return a + b * x

    def spread(self, now: float) -> float:
        """The root mean square of the residuals above the line (those below count as 0),
        fading to 0 (one pseudo-observation of 0) as the observations fade."""
        f = self._fade(now)
        return math.sqrt(f * self._sq / (f * self._w + 1.0))

    @property
    def last_at(self) -> float | None:
        """When the last observation came (None before any)."""
        return self._at

    def fixed_s(self) -> float:
        """What a request paid beyond its step-fit seconds (at the prior slope), robustly:
        the median over the observations after this fit's first, a0 with none. The prior
        of a fit that replaces this one (`TtftModel.forgotten`): a fresh a0 = 0 predicted
        the stage and first token as the step fits alone, without the HTTP hops and event
        loops (0.02-0.1 s a stage on the CPU bench) that no step marks. The first observation is left
        out (an instance's first request pays one-off compiles: 2.5 s on a GPU) and the
        median ignores a few more such."""
        later = list(self._excess)[1:] if self.count <= FIXED_MEMORY else list(self._excess)
        return max(0.0, statistics.median(later)) if later else self.a0

    def upper(self, x: float, now: float, z: float) -> float:
        return self.predict(x, now) + z * self.spread(now)

    def observe(self, x: float, seconds: float, now: float) -> None:
        """A request's stage took `seconds` where its step fits said `x`."""
        if not (math.isfinite(x) and math.isfinite(seconds) and x >= 0 and seconds > 0):
            return
        # only what ran longer than predicted widens the margin: a stage shorter than a
        # pessimistic prediction (a probe after a slow moment: 0.17 s where 1.1 was
        # predicted) squared into the spread kept every request of a bench run out
        resid = max(0.0, seconds - self.predict(x, now))
        keep = KEEP * self._fade(now)
        self._sq = keep * self._sq + resid * resid
        self._w = keep * self._w + 1.0
        for i, v in enumerate((1.0, x, seconds, x * x, x * seconds)):
            self._s[i] = keep * self._s[i] + v
        self._excess.append(seconds - self.b0 * x)
        self._at = now
        self.count += 1
