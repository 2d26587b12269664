"""The sync-free reads of a tiered library (`ChunkTiers`, tiers.py, a mixin of it): a
layer whose cache holds every chunk, a skipping step under `sync="step"` and
`attend_resident` read nothing from the host; their uses are counted on the device
(tier_ledger.py) and settled here once per step (hits, misses, the eviction policy's uses,
and the misses fetched for later steps)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moska.kernels.selections import Selections
from moska.library.chunk_cache import SlotCache
from moska.library.tier_config import TierConfig, TierStats
from moska.library.tier_ledger import DemandLedger
from moska.library.tier_select import _swap_plan


class SyncFreeReads:
    config: TierConfig
    num_chunks: int
    num_slots: int
    caches: list[SlotCache[int]]
    stats: TierStats
    ledger: DemandLedger
    _snaps: list[tuple[int, frozenset[int]]]
    _last: list[list[int]]

    if TYPE_CHECKING:  # ChunkTiers' own

        def prefetch(self, layer: int, chunks: list[int], protect=()) -> None: ...

        def _prefetch_next(self, layer: int, chunks: list[int]) -> None: ...

    def _sync_free(self, layer: int, wait: bool | None) -> bool:
        """Whether `layer`'s read needs nothing from the host first: its cache holds every
        chunk (nothing can miss), or a skipping step under `sync="step"`."""
        if len(self.caches[layer].slot_of) == self.num_chunks:
            return True
        skip = self.config.miss_policy == "skip" if wait is None else not wait
        return skip and self.config.sync == "step"

    def _demand(self, sel: Selections) -> dict[int, int]:
        """The routed chunks with their selection counts (the skip swap's demand): one host
        read of a [C] count, counted on the device (no `unique`: a sort and two reads)."""
        return {c: k for c, k in enumerate(self.ledger.count_now(sel.chunk)) if k}

    def _resident_snapshot(self, layer: int) -> frozenset[int]:
        cache = self.caches[layer]
        version, snap = self._snaps[layer]
        if version != cache.version:
            snap = frozenset(cache.slot_of)
            self._snaps[layer] = (cache.version, snap)
        return snap

    def flush(self) -> None:
        """Settle every sync-free read so far (waits for the device): before reading
        `stats` or residency exactly, e.g. in tests and at a benchmark's end."""
        self.ledger.close_step()
        self._settle(force=True)

    def _settle(self, force: bool = False) -> None:
        """The closed steps' counts that reached the host: hits and misses, the policy's
        uses, and (skip) the misses fetched for later steps, as `stage` and `finish` do."""
        self.ledger.close_step()
        for read in self.ledger.ready(force):
            assert read.counts is not None
            demand = {c: k for c, k in enumerate(read.counts) if k}
            present = [c for c in demand if c in read.resident]
            absent = [c for c in demand if c not in read.resident]
            s = self.stats
            s.hits["gpu"] += len(present)
            s.misses["gpu"] += len(absent)
            s.skipped += sum(demand[c] for c in absent)
            self._last[read.layer] = present + absent
            if not absent and self.num_slots >= self.num_chunks:
                continue  # every chunk fits: nothing is evicted, no use worth recording
            cache = self.caches[read.layer]
            cache.tick()
            live = [c for c in present if c in cache]
            cache.admit(live, count=False)  # a use: the policy's clock and counts
            if absent:
                self.prefetch(read.layer, *_swap_plan(absent, live, demand, self.num_slots))
            self._prefetch_next(read.layer, live)
