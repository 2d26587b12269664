"""Admission's safety margin: how long recent first tokens waited between the engine and
their HTTP handler, learned from what was observed and added to a predicted TTFT before it
is compared with what fits the SLO (`AdmissionController.fits_s`).

Why: the client's time to first token ends when its handler writes the token, not when
the engine made it, and admission's prediction (like the engine's TTFT metric) stops at
the engine's step. Measured with `moska bench load --trace` (CPU, SLO 5 s, a loaded
2-core box): that wait was 2-210 ms at 64 clients, 3-40 ms at 300 and 9 ms at 1,000,
small beside the SLO, so the margin is small; it is there so that a server whose loop
does fall behind (a slow host, many streams) plans for it.

Not the step-time error as well: the slowdown factor already plans on the slow side of
recent step errors, and a margin of late steps on top counted them twice. Samples come
only from admitted requests, but an idle server always admits (admission's rule), so a
margin that shuts admission during a burst is unlearned by the first requests after it:
the window holds the last `window` samples, not a history.
"""

from __future__ import annotations

import threading
from collections import deque


def _quantile(values: deque[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class TtftMargin:
    """Seconds to add to a predicted TTFT (`seconds`): the `quantile` of the last
    `window` delivery delays. Thread-safe (deliveries come from the event loop)."""

    def __init__(self, window: int = 64, quantile: float = 0.9) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.quantile = quantile
        self._delivery: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def delivered(self, seconds: float) -> None:
        """A first token reached its HTTP handler `seconds` after the engine made it."""
        if seconds >= 0:
            with self._lock:
                self._delivery.append(seconds)

    @property
    def seconds(self) -> float:
        with self._lock:
            return _quantile(self._delivery, self.quantile)
