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
in flight on an instance (0 with none, or with none late yet).
"""

from __future__ import annotations


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

    def ratio(self, inst: str, now: float) -> float:
        """max over `inst`'s items of (seconds since its last move) / (predicted seconds)."""
        items = self._items.get(inst)
        if not items:
            return 0.0
        return max((now - at) / pred for at, pred in items.values())
