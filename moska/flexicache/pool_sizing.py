"""Slot allocation, eviction and sizing of the FlexiCache page store's per-layer device pools
(`store.py`): a mixin of `FlexiKV` (a re-ranking's `_sync`, a page start's `_start_page`).

Allocation runs on the device: which slots are free is read from the slot map itself (no
free list on the host), and the i-th page that needs a slot (in page order) takes the i-th
free slot, then, under hysteresis, the slot of the i-th idle page (resident, no longer
kept), the longest dropped first (that page is evicted). So a re-ranking issues its
allocation and fetch without reading anything back, as long as the host knows the pool has
room: `keep_bound` (host arithmetic) bounds what the layer's heads keep, and a pool at least
that large holds every kept page (the pages needed fit in the free and idle slots). Only
when it does not, one read of the layer's counts decides how much to grow (as the host
free list did: evict every idle page, grow by max(missing + a page per head, pool_slack)).

A pool resize copies the layer's whole pool, so pools grow by at least `pool_slack` of
their size and are compacted only when over twice the slack beyond what their heads keep:
allocation follows the kept pages, not their peak. Compaction is decided once per
re-ranking step for every layer (`compact_all`: one read of all layers' counts), on the
same state as right after each layer's re-ranking (nothing changes a layer's slots between
its re-ranking and the end of the step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moska.flexicache.config import FlexiCacheConfig
from moska.flexicache.transfer import to_device

BIG = 2**62


class PoolSizing:
    cfg: FlexiCacheConfig
    shape: tuple[int, int, int, int, int, int]  # (L, B, H, P, bs, D)
    device: torch.device
    slot: torch.Tensor  # [L, B, H, P] int64: a page's pool slot, -1: not resident
    kept: torch.Tensor  # [L, B, H, P] bool: pages read
    dropped_step: torch.Tensor  # [L, B, H, P] int64
    pool_k: list[torch.Tensor]  # per layer [slots, bs, 1, D]
    pool_v: list[torch.Tensor]
    spare_pages: int
    pool_slack: float
    pool_version: int  # bumped whenever a layer's pool tensors are replaced
    hysteresis: bool
    length: int
    block_size: int
    step: int
    _reused: torch.Tensor
    host_reads: int  # reads of device values on the host (a wait on CUDA)
    on_read: Callable[[], None] | None  # called before each of them
    _evicted: torch.Tensor  # device counters
    _resident: torch.Tensor  # [L] resident pages per layer, on the device
    _peak: torch.Tensor
    _res_hi: list[int]  # per layer: an upper bound of its resident pages
    _res_exact: list[bool]  # per layer: _res_hi is the count (no eviction since it was read)
    _kept_hi: list[int]  # per layer: an upper bound of its kept pages (exact at compact_all)
    deferred_rerank: bool
    _n_forced: list[int]  # per layer: heads forced stable
    _synced: list[bool]  # per layer: re-ranked (and its kept pages made resident) once
    _ranked_now: list[int]  # layers re-ranked this step, in order (until `compact_all`)
    _fetch_masks: list[torch.Tensor]  # their pages fetched [B * H * P] bool
    _fetched: torch.Tensor
    _refetched: torch.Tensor

    def _update_kept(
        self, layer: int, keep: torch.Tensor, resident: torch.Tensor | None = None
    ) -> None:
        """Record dropped pages' step and the new kept set (device ops, no wait); `resident`:
        the layer's `slot >= 0` if the caller has it."""
        old = self.kept[layer]
        resident = self.slot[layer] >= 0 if resident is None else resident
        self._reused += (keep & resident & ~old).sum()
        self.dropped_step[layer].masked_fill_(old & ~keep, self.step)
        self.kept[layer] = keep

    def _start_page(self, layer: int, keep: torch.Tensor, page: int) -> None:
        """A step that starts `page`: every head keeps it (it is recent) and nothing else new
        (the kept set only loses the page that left the recent window), so it gets a free
        slot per head (the pool grown first if the host cannot tell there are enough);
        nothing to copy."""
        _, B, H, *_ = self.shape
        if not self.hysteresis:
            self._evict(layer, self.kept[layer] & ~keep)
        self._update_kept(layer, keep)
        n = B * H
        need = torch.zeros_like(keep)
        need[:, :, page] = True
        if self.hysteresis and self.deferred_rerank:  # idle pages' slots too: a pool that
            # grew here would be compacted at the next re-ranking (two CUDA graph recaptures)
            cap = self.pool_k[layer].shape[0]
            self._grow(layer, n - (cap - self._kept_hi[layer]))
            self._assign(layer, need, (self.slot[layer] >= 0) & ~keep)
        else:
            self._reserve(layer, n)
            self._assign(layer, need, None)
        self._kept_hi[layer] += n
        self._res_hi[layer] += n
        self._note_resident(layer)

    def _sync(self, layer: int, keep: torch.Tensor, fresh: int | None) -> None:
        """Fetch newly kept pages from the host into slots (page `fresh`, just started, only
        gets slots). A page no longer kept frees its slot at once, or under hysteresis stays
        in it (not read) until an allocation finds no free slot: then such pages are
        evicted, the longest dropped first. Nothing is read back while the pool holds the
        layer's `keep_bound`."""
        resident = self.slot[layer] >= 0
        self._update_kept(layer, keep, resident)
        need = keep & ~resident
        idle = resident & ~keep
        if not self.hysteresis:
            self._evict(layer, idle)
        n_pages = -(-self.length // self.block_size)
        bound = self.keep_bound(layer, n_pages)
        exact = self._make_room(layer, bound)
        new = self._assign(layer, need, idle if self.hysteresis else None)
        self._res_hi[layer] = self.pool_k[layer].shape[0]  # until `compact_all` reads it
        self._res_exact[layer] = False
        self._ranked_now.append(layer)  # resident and peak counts: at `compact_all`
        limit = min(self.fetch_bound(layer, n_pages), bound, self.pool_k[layer].shape[0])
        self._synced[layer] = True
        self._fetch(layer, need, new, fresh, limit if exact is None else exact)

    def _fetch(self, layer, need, new, fresh, limit) -> None:
        """Copy the pages `need` into their new slots (`FlexiKV`)."""
        raise NotImplementedError

    def _relist(self, layer: int) -> None:
        """The layer's head lists again after its slots moved (`FlexiKV`)."""
        raise NotImplementedError

    def _read(self, t: torch.Tensor) -> list:
        """A device tensor's values on the host: one wait on CUDA, counted (`on_read`, if
        set, is called first: the speed bench's device-time probe)."""
        self.host_reads += 1
        if self.on_read is not None:
            self.on_read()
        return t.tolist()

    def keep_bound(self, layer: int, n_pages: int) -> int:
        """An upper bound of the pages the layer's heads keep at `n_pages` pages: a head
        forced stable at most top-K + sink + recent, any other every page (a head may turn
        unstable at any re-ranking)."""
        _, B, H, *_ = self.shape
        cfg = self.cfg
        if not cfg.long_enough(n_pages):
            return B * H * n_pages
        f = self._n_forced[layer]
        per = min(n_pages, cfg.top_k_pages + cfg.recent_pages + cfg.sink_pages)
        return f * per + (B * H - f) * n_pages

    def fetch_bound(self, layer: int, n_pages: int) -> int:
        """An upper bound of the pages a re-ranking at `n_pages` pages must give slots. Every
        page kept so far is resident, so only pages not kept so far are needed: a head
        forced stable adds at most its top-K and the page started now; a head that is
        never stable (threshold > 1, not forced) keeps every page already, the new page
        only; any other head may turn unstable and need all of them. Before a layer's first
        re-ranking nothing is kept: `keep_bound`."""
        cfg = self.cfg
        if not self._synced[layer]:
            return self.keep_bound(layer, n_pages)
        _, B, H, *_ = self.shape
        f = self._n_forced[layer]
        other = 1 if cfg.threshold > 1 else n_pages
        return f * min(n_pages, cfg.top_k_pages + 1) + (B * H - f) * other

    def _note_resident(self, layer: int, peak: bool = True) -> None:
        self._resident[layer] = (self.slot[layer] >= 0).sum()
        if peak:
            torch.maximum(self._peak, self._resident.sum(), out=self._peak)

    def _account_ranked(self, kept: torch.Tensor, idle: torch.Tensor) -> None:
        """At `compact_all`, for the layers re-ranked this step (`_ranked_now`, in order),
        from every layer's kept and idle resident pages [L]: the pages fetched (and those
        dropped at the previous re-ranking or later) and the peak of resident pages, as if
        counted right after each layer's re-ranking with the layers before it compacted,
        the ones after it not re-ranked yet (their slots do not change between their
        re-ranking and the end of the step): a few ops per step instead of some 25 per
        layer."""
        ranked, self._ranked_now = self._ranked_now, []
        fetch, self._fetch_masks = self._fetch_masks, []
        if not ranked:
            return
        _, B, H, *_ = self.shape
        idx = to_device(ranked, self.device)
        if fetch:
            copy = torch.stack(fetch)  # [n, B * H * P] pages fetched per re-ranked layer
            recent = self.dropped_step[idx].view(len(ranked), -1)
            recent = recent >= self.step - self.cfg.rerank_interval
            self._fetched += copy.sum()
            self._refetched += (copy & recent).sum()
        n, n_idle = kept[idx], idle[idx]
        caps = to_device([self.pool_k[layer].shape[0] for layer in ranked], self.device)
        spare = B * H * (1 + self.spare_pages)
        limit = n + spare + ((2 * (n + spare)).double() * self.pool_slack).floor().long()
        post = torch.where(caps > limit, n + n_idle.clamp(max=spare), n + n_idle)
        old = self._resident[idx]
        at_rank = self._resident.sum() + (post - old).cumsum(0) - post + n + n_idle
        torch.maximum(self._peak, at_rank.max(), out=self._peak)
        self._resident[idx] = post

    def _evict(self, layer: int, pages: torch.Tensor) -> None:
        """Free the slots of `pages` [B, H, P] bool (those resident), on the device."""
        slot = self.slot[layer]
        pages = pages & (slot >= 0)
        self._res_exact[layer] = False
        self._evicted += pages.sum()
        slot.masked_fill_(pages, -1)

    def _assign(self, layer: int, need: torch.Tensor, idle: torch.Tensor | None) -> torch.Tensor:
        """Give the pages `need` [B, H, P] bool (not resident) slots, on the device: free
        slots first (lowest first), then (idle [B, H, P] given) the slots of idle pages, the
        longest dropped first, which are evicted. The caller made room (pages needed <= free
        + idle slots). Returns the flat new slot of each page (valid where `need`)."""
        flat = self.slot[layer].view(-1)
        cap = self.pool_k[layer].shape[0]
        need_f = need.reshape(-1)
        if cap == 0:  # room for nothing: nothing is needed
            return flat.clone()
        res = flat >= 0
        occ = torch.zeros(cap + 1, dtype=torch.int64, device=flat.device)
        occ.scatter_(0, torch.where(res, flat, cap), 1)
        free_cum = (1 - occ[:cap]).cumsum(0)  # free slots up to each slot
        n_free = free_cum[-1]
        n_before = need_f.cumsum(0)  # needed pages up to each page
        rank = n_before - 1  # each needed page's rank among them
        new = torch.searchsorted(free_cum, n_before).clamp(max=cap - 1)  # rank-th free slot
        if idle is not None:
            idle_f = idle.reshape(-1) & res
            when = torch.where(idle_f, self.dropped_step[layer].view(-1), BIG)
            order = when.argsort(stable=True)  # idle pages, the longest dropped first
            victim = order[(rank - n_free).clamp(0, order.numel() - 1)]
            new = torch.where(rank < n_free, new, flat[victim])
            pos = torch.empty_like(order)
            pos.scatter_(0, order, torch.arange(order.numel(), device=order.device))
            evict = idle_f & (pos < n_before[-1] - n_free)
            self._evicted += evict.sum()
            flat.masked_fill_(evict, -1)
        flat.copy_(torch.where(need_f, new, flat))
        return new

    def _reserve(self, layer: int, n: int) -> None:
        """Grow the layer's pool until `n` slots are free (plus one page per head), by at
        least `pool_slack` of its size; reads the layer's resident count only when its
        bound, not exact, leaves fewer than `n` free."""
        cap = self.pool_k[layer].shape[0]
        if cap - self._res_hi[layer] >= n:
            return
        if not self._res_exact[layer]:
            (self._res_hi[layer],) = self._read(self._resident[layer : layer + 1])
            self._res_exact[layer] = True
        res = self._res_hi[layer]
        self._grow(layer, n - (cap - res))

    def _grow(self, layer: int, missing: int) -> None:
        """Add max(missing + a page per head, pool_slack of the pool) slots if missing > 0."""
        if missing <= 0:
            return
        cap = self.pool_k[layer].shape[0]
        grow = max(missing + self.shape[1] * self.shape[2], int(cap * self.pool_slack))
        self.pool_version += 1  # new pool tensors: a CUDA graph of a plain step is stale
        for pool in (self.pool_k, self.pool_v):
            t = pool[layer]
            pool[layer] = torch.cat([t, t.new_zeros(grow, *t.shape[1:])])

    def _make_room(self, layer: int, n_kept: int) -> int | None:
        """Before a re-ranking's allocation (`kept` already the new kept set): room for a
        kept set of at most `n_kept` pages without a read (returns None), or one read of
        (needed, resident, idle) counts, and if the needed pages exceed the free and idle
        slots every idle page evicted and the pool grown (returns the exact number needed)."""
        cap = self.pool_k[layer].shape[0]
        if cap >= n_kept:
            return None
        slot, keep = self.slot[layer], self.kept[layer]
        res = slot >= 0
        idle_m = res & ~keep
        n, n_res, n_idle = self._read(torch.stack([(keep & ~res).sum(), res.sum(), idle_m.sum()]))
        free = cap - n_res
        if n > free + n_idle:
            if n_idle:
                self._evict(layer, idle_m)
            self._grow(layer, n - free - n_idle)
        return n

    def compact_all(self) -> None:
        """After a re-ranking step: one read of every layer's kept and idle counts, then
        each pool over twice its slack is shrunk (see `_compact`)."""
        res = self.slot >= 0
        kept = (res & self.kept).sum((1, 2, 3))
        idle = (res & ~self.kept).sum((1, 2, 3))
        self._account_ranked(kept, idle)
        counts = self._read(torch.stack([kept, idle], 1))
        for layer, (n, n_idle) in enumerate(counts):
            self._res_hi[layer] = n + n_idle
            self._kept_hi[layer] = n
            self._res_exact[layer] = True
            self._compact(layer, n, n_idle)

    def _compact(self, layer: int, n: int, n_idle: int) -> None:
        """Shrink the layer's pool to its `n` kept pages, a page per head and the slack (a
        device gather) once it is over twice the slack, so that its allocation follows what
        the heads keep. Idle pages fill the spare slots, the last dropped first; the others
        are evicted."""
        _, B, H, *_ = self.shape
        spare = B * H * (1 + self.spare_pages)
        cap = n + spare + int((n + spare) * self.pool_slack)
        if self.pool_k[layer].shape[0] <= n + spare + int(2 * (n + spare) * self.pool_slack):
            return
        flat = self.slot[layer].view(-1)
        res = flat >= 0
        kept = res & self.kept[layer].view(-1)
        m = n + min(n_idle, spare)
        # idle pages, the last dropped first (ties: the reverse of `_assign`'s eviction order)
        pages = torch.arange(flat.numel(), device=flat.device)
        last = -(self.dropped_step[layer].view(-1) * flat.numel() + pages)
        key = torch.where(kept, -BIG, torch.where(res, last, BIG))
        stay = key.argsort(stable=True)[:m]  # kept pages, then the last dropped idle ones
        old = flat[stay]
        for pool in (self.pool_k, self.pool_v):
            t = pool[layer]
            new = t.new_empty(cap, *t.shape[1:])
            new[:m] = t[old]
            pool[layer] = new
        self.pool_version += 1
        flat.fill_(-1)
        flat[stay] = torch.arange(m, device=flat.device)
        self._evicted += n_idle - (m - n)
        self._res_hi[layer] = m
        self._note_resident(layer, peak=False)
        self._relist(layer)
