"""Slot bookkeeping of a chunk cache: which chunk sits in which slot, and which to evict.

Plain Python, no torch: a tier (GPU slots of one layer, pinned CPU slots) owns one
`SlotCache` and moves the bytes itself. Eviction policies rank resident keys; the keys a
step needs are protected from eviction while it runs (`admit` takes them all at once).

Policies:
- `lru`: least recently used first.
- `lfu`: frequency with exponential aging (a key's count halves every `half_life` ticks
  without use), least first, so a chunk that many requests route to stays while a burst
  of one-off chunks passes through. The aged count needs no sweep: ranking by
  ``log2(count) + t / half_life`` at the last update orders keys as the aged counts at any
  later tick do. Counts of evicted keys are kept (a returning chunk keeps its history).
Measured on uniform and Zipf(1.0) routing traces: `moska/bench/tier_eviction.py`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

EVICTION_POLICIES = ("lru", "lfu")


K = TypeVar("K", bound=Hashable)  # a cache's key: a chunk id, or (layer, chunk)


class EvictionPolicy:
    """Ranks keys for eviction. Contract: `touch(keys, now)` after every use; `victims(
    resident, m)` names the m lowest-ranked of `resident` (fewer when there are fewer)."""

    def touch(self, keys: Iterable[Hashable], now: int) -> None:
        raise NotImplementedError

    def rank(self, key: Hashable) -> float:
        raise NotImplementedError

    def victims(self, resident: Iterable[K], m: int) -> list[K]:
        if m <= 0:
            return []
        return heapq.nsmallest(m, resident, key=self.rank)


class LRUPolicy(EvictionPolicy):
    def __init__(self) -> None:
        self._last: dict[Hashable, int] = {}

    def touch(self, keys: Iterable[Hashable], now: int) -> None:
        for k in keys:
            self._last[k] = now

    def rank(self, key: Hashable) -> float:
        return self._last.get(key, -1)


class LFUPolicy(EvictionPolicy):
    """Frequency with aging; ties go to the least recently used."""

    def __init__(self, half_life: float = 64.0) -> None:
        if half_life <= 0:
            raise ValueError(f"half_life must be positive, got {half_life}")
        self.half_life = half_life
        self._count: dict[Hashable, tuple[float, int]] = {}  # key -> (count at t, t)

    def touch(self, keys: Iterable[Hashable], now: int) -> None:
        for k in keys:
            c, t = self._count.get(k, (0.0, now))
            self._count[k] = (c * 2.0 ** (-(now - t) / self.half_life) + 1.0, now)

    def rank(self, key: Hashable) -> float:
        c, t = self._count.get(key, (0.0, 0))
        if c <= 0:
            return -math.inf
        return math.log2(c) + t / self.half_life + t * 1e-12  # the tie-break: recency


def make_policy(name: str) -> EvictionPolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    raise ValueError(f"unknown eviction policy {name!r}; use one of {EVICTION_POLICIES}")


@dataclass
class Admission(Generic[K]):
    """What one `admit` decided: hits (key, slot), loads (key, slot) the caller must fill,
    the keys it evicted, and the keys that did not fit this time (the step needs more
    chunks than the cache has slots: the caller runs them in a later pass)."""

    hits: list[tuple[K, int]] = field(default_factory=list)
    loads: list[tuple[K, int]] = field(default_factory=list)
    evicted: list[K] = field(default_factory=list)
    overflow: list[K] = field(default_factory=list)


class SlotCache(Generic[K]):
    """`num_slots` slots holding keys; a policy picks victims. Not thread-safe (one owner)."""

    def __init__(self, num_slots: int, policy: str | EvictionPolicy = "lru") -> None:
        if num_slots < 1:
            raise ValueError(f"a chunk cache needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.slot_of: dict[K, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))  # pop() gives slot 0 first
        self.now = 0
        self.version = 0  # bumped whenever the resident keys change (a snapshot's key)
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: object) -> bool:
        return key in self.slot_of

    def tick(self) -> None:
        """One step passed (the policies' clock)."""
        self.now += 1

    def admit(
        self, keys: Sequence[K], protect: Iterable[K] = (), count: bool = True
    ) -> Admission[K]:
        """Make `keys` resident, hits first, evicting neither `keys` nor `protect`. Keys
        beyond the free and evictable slots go to `overflow`. `count=False` (a prefetch)
        leaves the hit and miss counters alone."""
        out: Admission[K] = Admission()
        keys = list(dict.fromkeys(keys))
        missing: list[K] = []
        for k in keys:
            slot = self.slot_of.get(k)
            if slot is None:
                missing.append(k)
            else:
                out.hits.append((k, slot))
        keep = set(keys) | set(protect)
        need = len(missing) - len(self._free)
        if need > 0:
            evictable = [k for k in self.slot_of if k not in keep]
            for victim in self.policy.victims(evictable, need):
                self._free.append(self.slot_of.pop(victim))
                out.evicted.append(victim)
        for k in missing:
            if not self._free:
                out.overflow.append(k)
                continue
            slot = self._free.pop()
            self.slot_of[k] = slot
            out.loads.append((k, slot))
        self.policy.touch([k for k, _ in out.hits] + [k for k, _ in out.loads], self.now)
        if out.loads or out.evicted:
            self.version += 1
        if count:
            self.hits += len(out.hits)
            self.misses += len(missing)
        return out

    def drop(self, key: K) -> None:
        """Forget `key` (its slot becomes free)."""
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self._free.append(slot)
            self.version += 1
