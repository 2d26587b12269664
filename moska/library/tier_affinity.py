"""Chunk-affinity decode scheduling for a tiered library: run the requests whose chunks are
resident now, swap the next chunks in while they run.

Why: at B = 256 with top-k routing over a few dozen chunks the batch's selections cover
nearly every chunk each step, so whatever the eviction policy, a step that runs every
request moves the whole non-resident share of the library over PCIe (bench/results/
tiers_h200.json: 18 GiB a step at 25% resident). A step that runs only the requests whose
chunks (as they routed at their last step) are resident reads only resident chunks, unless
their routing moved; the others wait, and the chunks most wanted by the waiting requests
are fetched on the copy stream while the step runs. Output tokens are unchanged (each
request's decode is its own; scheduling changes only when it runs), so this is exact
under the "wait" miss policy.

Fairness: a request that waited `max_wait` steps runs at the next step whatever it costs
(its misses are then waited for), so no request's inter-token gap exceeds `max_wait` + 1
steps. The planner is plain Python over chunk ids (logical ids: the caller maps them to
each layer's cache); the caller tells it what is resident each step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AffinityConfig:
    """max_wait: steps a request may be held back (its TPOT is at most max_wait + 1 steps).
    swap_chunks: chunks fetched per step for waiting requests (the copy stream's share of a
    step: about step time x H2D bandwidth / chunk bytes). min_run: below this many ready
    requests the longest-waiting ones are added, so a step never runs near-empty."""

    max_wait: int = 8
    swap_chunks: int = 1
    min_run: int = 1

    def __post_init__(self) -> None:
        if self.max_wait < 0 or self.swap_chunks < 0 or self.min_run < 1:
            raise ValueError(
                f"need max_wait >= 0, swap_chunks >= 0 and min_run >= 1, got {self.max_wait}, "
                f"{self.swap_chunks}, {self.min_run}"
            )


@dataclass
class AffinityPlan:
    """One step: `run` the requests to decode now; `fetch` chunks to bring in for the
    waiting ones (in place of `evict`, resident chunks no running request wants)."""

    run: list[int]
    fetch: list[int]
    evict: list[int]
    forced: int = 0  # requests run because they had waited max_wait steps


@dataclass
class AffinityScheduler:
    """Chooses, each step, which requests of the batch decode (see the module docstring)."""

    slots: int
    config: AffinityConfig = field(default_factory=AffinityConfig)
    waited: dict[int, int] = field(default_factory=dict)

    def plan(self, wants: Mapping[int, frozenset[int]], resident: set[int]) -> AffinityPlan:
        """`wants`: each active request's chunks (its last routing); `resident`: the chunks
        in GPU slots now. Call `ran(plan.run)` after the step."""
        for r in list(self.waited):
            if r not in wants:
                del self.waited[r]  # finished
        wait = {r: self.waited.setdefault(r, 0) for r in wants}
        missing = {r: wants[r] - resident for r in wants}
        ready = [r for r in wants if not missing[r]]
        late = [r for r in wants if missing[r] and wait[r] >= self.config.max_wait]
        run = ready + late
        if len(run) < self.config.min_run:  # the longest-waiting, fewest misses first
            rest = sorted(
                (r for r in wants if missing[r] and r not in late),
                key=lambda r: (-wait[r], len(missing[r])),
            )
            run += rest[: self.config.min_run - len(run)]
        running = set(run)
        held = [r for r in wants if r not in running]
        fetch, evict = self._swap(wants, missing, held, resident, running)
        return AffinityPlan(run, fetch, evict, len(late))

    def ran(self, run: list[int]) -> None:
        """After a step: the requests that ran start waiting afresh, the others age."""
        done = set(run)
        for r in self.waited:
            self.waited[r] = 0 if r in done else self.waited[r] + 1

    def _swap(
        self,
        wants: Mapping[int, frozenset[int]],
        missing: dict[int, frozenset[int]],
        held: list[int],
        resident: set[int],
        running: set[int],
    ) -> tuple[list[int], list[int]]:
        """The chunks to bring in for the held requests: each held request spreads a weight
        of (1 + steps waited) over its missing chunks; the best `swap_chunks` come in when
        a slot is free or a resident chunk that no running request reads is wanted less
        (by the held requests that would read it)."""
        # the running requests' chunks come in with their step (waited for) anyway
        in_use = set().union(*(wants[r] for r in running)) if running else set()
        want: defaultdict[int, float] = defaultdict(float)
        for r in held:
            for c in missing[r] - in_use:
                want[c] += (1 + self.waited.get(r, 0)) / len(missing[r])
        if not want or self.config.swap_chunks == 0:
            return [], []
        keep_value: defaultdict[int, float] = defaultdict(float)
        for r in held:
            if len(missing[r]) <= self.config.swap_chunks:  # could run soon: keep its chunks
                for c in wants[r] & resident:
                    keep_value[c] += 1 + self.waited.get(r, 0)
        free = max(0, self.slots - len(resident))
        victims = sorted((c for c in resident if c not in in_use), key=lambda c: keep_value[c])
        fetch: list[int] = []
        evict: list[int] = []
        best = sorted(want.items(), key=lambda cw: -cw[1])[: self.config.swap_chunks]
        for c, w in best:
            if free > 0:
                free -= 1
            elif victims and keep_value[victims[0]] < w:
                evict.append(victims.pop(0))
            else:
                break
            fetch.append(c)
        return fetch, evict
