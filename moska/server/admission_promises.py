"""A 429's promise corrected by how the server's own recent promises came out, per kind of
request (plain / library) and where it was refused (at the door / after reading it). Off
by default (`AdmissionController.promises.enabled`): on the device's idle cores it was a
wash with opposite signs (within 2x 0.68 vs 0.59 without it in session 17's call 1, 0.57
vs 0.71 in call 2; docs/admission.md); `moska bench load --promise-learning on` runs it.

Why: the drain replay (`retry_drain`) predicts a small difference of large quantities (a
TTFT of ~4.5 s less the ~4.25 s that fits) and the future of a burst it cannot see (how
many of those inside the door admission takes, how fast the event loop lets the engine
run). On the device's idle CPU cores (session 16, 18 bursts per arm) its errors were
systematic per group, not noise around 1: library 429s at the door promised 0.5-1.0 s for
1.3-2.7 s at 300 and 1,000 clients (too short, in 7 of 8 bursts), plain 429s after
admission 0.3-0.7 s for 0.04-0.16 s (too long, in every 1,000 burst). A bias that keeps
its sign is what a learnt scale fixes, and the server can observe its own promises
without any client: a retry of a refused request would be admitted at the first moment
admission, asked about that request, says yes. So some 429s (`sample_s` apart per group)
are kept open; at later decisions (`due`, at most one check per group per `check_s`: each
is one queue replay) the controller asks whether the oldest open one would be admitted
now; the first yes is its observed drain, and the group's scale moves toward observed /
raw promise (a moving average of the log, `alpha`, clamped to `clamp`x either way). One
still refused after `horizon`x its promise (or `min_horizon_s`) closes with that wait as
a lower bound. The raw promise (the replay's) is what is learnt against, so the scale
does not feed on itself. The learnt log scale fades with the time since the group last
learnt (`memory_s`): a burst's bias is about that burst (replayed over the kept session
14-15 runs, `load_promise_replay`: within 2x of the probes' drain 0.71 raw, 0.73 scaled
with 5 s; kept whole from a 300-client burst into a 1,000 one it turned session 14's
`final` plain door 429s from 1.00 to 0.78).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from moska.server.queue_replay import RequestCost

GROUPS = ("plain_door", "plain_queue", "library_door", "library_queue")


def group_of(cost: RequestCost, at_door: bool) -> str:
    """The group of a 429: kind (a library request or not) and place."""
    return f"{'library' if cost.library_attend else 'plain'}_{'door' if at_door else 'queue'}"


@dataclass
class OpenPromise:
    """A 429 kept to learn from: its group, the request it stood for, when (monotonic s),
    the raw (unscaled) drain it was promised, and when a check last found it still refused
    (`refused`: its drain is later than that)."""

    group: str
    cost: RequestCost
    t: float
    raw_s: float
    refused: float = -math.inf


class PromiseScale:
    """Per-group scales of 429 drains, learnt from the server's own promises. Not
    thread-safe: the controller calls it under its lock or from the event loop only."""

    def __init__(
        self,
        alpha: float = 0.3,
        clamp: float = 4.0,
        sample_s: float = 0.1,
        check_s: float = 0.1,
        max_open: int = 4,
        horizon: float = 4.0,
        min_horizon_s: float = 2.0,
        memory_s: float = 5.0,
    ) -> None:
        self.enabled = True
        self.recording = True  # False: promises are scaled, none kept (a bench's probes)
        self.alpha, self.clamp = alpha, clamp
        self.sample_s, self.check_s, self.horizon = sample_s, check_s, horizon
        self.min_horizon_s, self.memory_s = min_horizon_s, memory_s
        self._last = dict.fromkeys(GROUPS, -math.inf)  # when each group last learnt
        self.log = dict.fromkeys(GROUPS, 0.0)  # moving average of log(observed / raw)
        self.seen = dict.fromkeys(GROUPS, 0)  # promises closed
        self.max_open = max_open
        self.open: dict[str, deque[OpenPromise]] = {g: deque() for g in GROUPS}
        self._sampled = dict.fromkeys(GROUPS, -math.inf)
        self._checked = dict.fromkeys(GROUPS, -math.inf)

    def factor(self, group: str, now: float | None = None) -> float:
        """What a raw drain of `group` is multiplied by (1 while disabled or unlearnt); at
        `now`, faded by the time since the group last learnt (`memory_s`)."""
        if not self.enabled:
            return 1.0
        fade = 1.0 if now is None else self.factor_fade(group, now)
        return math.exp(self.log[group] * fade)

    def promise(self, group: str, cost: RequestCost, raw_s: float, now: float) -> float:
        """The drain to promise for a raw one of `raw_s` (scaled); keeps the 429 open to
        learn from if its group's last one is `sample_s` old."""
        if not (raw_s > 0 and math.isfinite(raw_s)):
            return raw_s
        pending = self.open[group]
        if (
            self.recording
            and now - self._sampled[group] >= self.sample_s
            and len(pending) < self.max_open
        ):
            self._sampled[group] = now  # (full: the oldest are kept, they resolve first)
            pending.append(OpenPromise(group, cost, now, raw_s, now))
        return raw_s * self.factor(group, now)

    def observe(self, group: str, observed_s: float, raw_s: float, now: float) -> None:
        """One promise came out: a retry would have been admitted `observed_s` after it."""
        self.log[group] *= self.factor_fade(group, now)
        self._last[group] = now
        bound = math.log(self.clamp)
        x = min(bound, max(-bound, math.log(max(observed_s, 1e-3) / raw_s)))
        self.log[group] += self.alpha * (x - self.log[group])
        self.seen[group] += 1

    def due(self, now: float, admits: Callable[[RequestCost], bool]) -> int:
        """Check each open promise of each group whose last check is `check_s` old:
        `admits(cost)` says whether a request like it would be admitted now (one replay per
        distinct cost: the door's promises share one). An admitted one closes, its drain
        known to (its last refusal, now]; it is learnt from only when that interval is
        within 2x (a check soon after a refusal: with no decisions between, a long quiet
        gap says nothing of the drain). One past its horizon closes; its last refusal is a
        lower bound, learnt from when it says the promise was too short. Returns the
        replays made."""
        checks = 0
        for group, pending in self.open.items():
            if not pending or now - self._checked[group] < self.check_s:
                continue
            self._checked[group] = now
            seen: dict[RequestCost, bool] = {}
            for p in list(pending):
                if p.cost not in seen:
                    checks += 1
                    seen[p.cost] = admits(p.cost)
                waited = now - p.t
                if seen[p.cost]:
                    pending.remove(p)
                    if now - p.refused <= max(2.5 * self.check_s, 0.5 * waited):
                        self.observe(group, waited, p.raw_s, now)
                    continue
                p.refused = now
                if waited > max(self.min_horizon_s, self.horizon * p.raw_s):
                    pending.remove(p)
                    self.observe(group, waited, p.raw_s, now)  # > horizon x: too short
        return checks

    def factor_fade(self, group: str, now: float) -> float:
        """How much of the group's learnt log scale is left at `now` (`memory_s`)."""
        return math.exp(-max(0.0, now - self._last[group]) / self.memory_s)

    def state(self) -> dict[str, dict[str, float]]:
        """Per group: the factor and how many promises it learnt from (for /metrics-like
        reports and the bench's JSON)."""
        return {
            g: {"factor": round(math.exp(self.log[g]), 3), "seen": self.seen[g]} for g in GROUPS
        }
