"""How late the work in flight on each instance is now: what the front end knows about a
slower host before anything has finished (#19).

The fits (`stage_fit.py`, `tpot_factor.py`) learn when a stage ends or a 4-token window
comes back. When the host slows at once (the 2-core CPU trace bench shares its cores with
other work), the requests admitted in the next few hundred ms were predicted from the host
before: on the bench, the first 8 requests of a round were admitted at 0.025-0.09 s per
token predicted while their tokens came at 0.11-0.16 s. But a stream whose next token has
not come after `gap` seconds already says the decode side runs at least `gap / predicted`
times slower than predicted, and a prefill still running after its predicted stage says
the same of its prefill instance. `ratio` is the largest such lower bound over the items
in flight on an instance (0 with none, or with none late yet); `ratio(.., quantile=0.5)`
the one half of them reach: every stream on a decode instance shares its steps, so a slower
instance makes them all late, while one late stream is its own hiccup (a relay, a pause).
On 2 H200s, 20-27 streams in flight, the largest put the time per token at ~0.03 s and
answered TPOT 429s (8-35 a round) where clients saw p99 0.015-0.02 s (#19, session 15).
"""

from __future__ import annotations

import math


class LiveLag:
    """Items in flight per instance: when each last moved and the seconds predicted for
    its next move."""

    def __init__(self) -> None:
        self._items: dict[str, dict[int, tuple[float, float]]] = {}

    def start(self, inst: str, key: int, at: float, predicted_s: float) -> None:
        """Item `key` on `inst` moved at `at`; its next move is predicted `predicted_s` later."""
        if predicted_s > 0:
            self._items.setdefault(inst, {})[key] = (at, predicted_s)

    def drop(self, key: int) -> None:
        for items in self._items.values():
            items.pop(key, None)

    def ratio(self, inst: str, now: float, quantile: float = 1.0) -> float:
        """(seconds since its last move) / (predicted seconds) over `inst`'s items: the
        largest (`quantile` 1) or that quantile of them (0.5: the median, the lower one of
        an even count)."""
        items = self._items.get(inst)
        if not items:
            return 0.0
        ratios = sorted((now - at) / pred for at, pred in items.values())
        return ratios[min(len(ratios) - 1, max(0, math.ceil(quantile * len(ratios)) - 1))]
