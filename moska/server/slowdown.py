"""Admission's slowdown factor: how much slower than the step-time fit recent steps ran
(`AdmissionController.slowdown`), robust to a lone outlier, and what the first step after
an idle gap is expected to overrun (`cold`).

Why robust: the factor is a fast moving average (of log observed/predicted, with its
variance), so one step 10x off moved it for every promise made over the next several
steps. Under `moska bench load` (CPU, 300 clients, half on a library) the first step after
an idle gap ran ~10x its prediction (the event loop answering the burst, caches gone
cold), the factor jumped to 4.6-5.9 and every 429 made while it lasted promised a drain
several times the real one, though the steps after ran as the fit said. So:
(1) a step that starts after an idle gap (`idle_gap_s` since the last step ended) does not
move the factor: its overrun is learned apart, as `cold`; (2) any other step far off the
factor (`outlier`, in log) is held until the next step: it is folded in if that step is
off on the same side too (a slower machine is still seen within two steps), else dropped.

Why `cold`: the front door decides on a burst before its first step starts, so it cannot
see that step's overrun the way admission does (`Load.busy_s`): at 300 clients the door
counted 48 requests admitted ahead where admission, deciding while that step ran 4.8x its
prediction, took 30. The door plans that step at `cold` x its prediction while the engine
is idle or runs its first step after a gap (`cold_pending`): only that step, since a
step after a gap was slow in itself (0.32 s for 0.024 predicted, a 46-token prefill), not
the steps after it (at 1,000 clients admission took 66 after a 5x first step of 0.15 s).

A booked retry's factor (`AdmissionController.booked_slow`, session 23) sets more aside.
(3) A step after the engine rested more than `rest_gap_s` (busy, the loop starts the next
step ~1 ms after the last; a burst after 0.06-0.25 s of rest is no "idle gap") moves
nothing: the CPU bench's bursts follow each other within 0.25-0.8 s, and the first one's
first step, 2.5-5.5x its prediction, took that factor from 1.4 to 2.6. (4) With
`decode_only` "fall", a step that prefilled nothing but attended the library may bring the
factor down, not up (a plain decode step moves it as any step, session 24):
a library decode tail ran 1.4-2.3x the fit (its library pairs cost more per pair than a
prefill's, one coefficient for both), while the next burst's prefill steps ran at
0.8-1.2x, and a booked retry's first token is a prefill. ("skip" leaves such steps out;
then the factor does not fall through a decode tail, which `retry_drain.factor_falls`
counts on.) The main factor keeps (3) and (4) off (`rest_gap_s` inf, "all"): with them,
new requests in the 300 and 1,000 bursts were taken twice as often and met the SLO less.
A one-off step (`warmup`, a library load) moves nothing but still ends: the next step's
rest counts from its end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from moska.server.step_model import StepFeatures


class Slowdown:
    """Not thread-safe (the controller locks). `clock`: seconds, monotonic."""

    def __init__(
        self,
        alpha: float = 0.25,
        deviations: float = 0.5,
        outlier: float = math.log(3.0),
        idle_gap_s: float = 1.0,
        rest_gap_s: float = math.inf,
        decode_only: str = "all",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.alpha = alpha
        self.deviations = deviations
        self.outlier = outlier
        self.idle_gap_s = idle_gap_s
        self.rest_gap_s = rest_gap_s  # (3) of the module docstring: inf, off
        self.decode_only = decode_only  # (4): "all" (moves it), "fall" or "skip"
        self.clock = clock
        self.log_mean = 0.0  # moving average of log(observed / predicted step time)
        self.log_var = 0.0  # and of its squared deviation
        self.log_cold = 0.0  # of post-idle steps, relative to `log_mean` (0 until seen)
        self._held: float | None = None  # a lone outlier's log ratio, awaiting the next step
        self._last_end: float | None = None
        self._cold_seen = False

    def scale(self) -> float:
        """The factor: the mean `deviations` deviations on the slow side."""
        return math.exp(self.log_mean + self.deviations * math.sqrt(self.log_var))

    def cold(self) -> float:
        """What a step after an idle gap is expected to run, over the fit (>= `scale`)."""
        return max(self.scale(), math.exp(self.log_mean + self.log_cold))

    def cold_pending(self, busy_s: float) -> bool:
        """Whether the next step (engine idle: `busy_s` 0) or the one in progress starts
        after an idle gap."""
        if self._last_end is None:
            return False
        return self.clock() - max(0.0, busy_s) - self._last_end > self.idle_gap_s

    def observe(
        self, ratio: float, seconds: float, step: StepFeatures | None = None, warmup: bool = False
    ) -> None:
        """A step ran `ratio` times its (unscaled) prediction, ending now after `seconds`,
        doing `step` (`decode_only`: what one with no prompt but library rows does; a plain
        decode step moves the factor as any step: its rows cost what the fit says, and at
        256 plain rows on CPU they ran 1.3x the fit, session 24, where a factor that could
        only fall let booked retries in that missed the SLO); one that paid a one-off
        (`warmup`) only ends (the next one's rest counts from it)."""
        now = self.clock()
        gap = math.inf if self._last_end is None else now - seconds - self._last_end
        after_idle = self.idle_gap_s < gap < math.inf
        self._last_end = now
        decode_only = (
            step is not None
            and step.prefill_tokens <= 0 < step.library_pairs
            and self.decode_only != "all"
        )
        if warmup or (decode_only and self.decode_only == "skip"):
            return
        if self.rest_gap_s < gap <= self.idle_gap_s:  # after a rest: set aside
            return
        x = math.log(min(max(ratio, 0.1), 10.0))
        if decode_only:  # "fall": it may bring the factor down, not up
            x = min(x, self.log_mean)
        if after_idle:  # the first one sets it: bursts after a gap may be rare
            rate = self.alpha if self._cold_seen else 1.0
            self.log_cold += rate * (x - self.log_mean - self.log_cold)
            self._cold_seen = True
            return
        held, self._held = self._held, None
        dev = x - self.log_mean
        if held is not None and (held - self.log_mean) * dev > 0 and abs(dev) > self.outlier / 2:
            self._fold(held)  # confirmed: the machine did change speed
        elif held is None and abs(dev) > self.outlier + 2 * math.sqrt(self.log_var):
            self._held = x
            return
        self._fold(x)

    def _fold(self, x: float) -> None:
        dev = x - self.log_mean
        self.log_mean += self.alpha * dev
        self.log_var += self.alpha * (dev * dev - self.log_var)
