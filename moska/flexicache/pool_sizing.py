"""Sizing and eviction of the FlexiCache page store's per-layer device pools (`store.py`):
a mixin of `FlexiKV`. A pool resize copies the layer's whole pool, so pools grow by at least
`pool_slack` of their size and are compacted (at re-rankings) only when over twice the
slack beyond what their heads keep: allocation follows the kept pages, not their peak, at a
copy every few re-rankings rather than two at each. Eviction frees slots of idle pages
(resident, no longer kept), the longest dropped first."""

from __future__ import annotations

import torch


class PoolSizing:
    shape: tuple[int, int, int, int, int, int]  # (L, B, H, P, bs, D)
    device: torch.device
    slot: torch.Tensor  # [L, B, H, P] int64: a page's pool slot, -1: not resident
    dropped_step: torch.Tensor  # [L, B, H, P] int64
    pool_k: list[torch.Tensor]  # per layer [slots, bs, 1, D]
    pool_v: list[torch.Tensor]
    free: list[list[int]]  # per layer: free slots (popped from the end)
    spare_pages: int
    pool_slack: float
    evicted_pages: int
    _resident: list[int]

    def _evict(self, layer: int, pages: torch.Tensor) -> None:
        """Free the slots of `pages` [B, H, P] bool (those resident)."""
        slot = self.slot[layer]
        pages = pages & (slot >= 0)
        freed = slot[pages].tolist()
        if freed:
            self.free[layer].extend(freed)
            self.evicted_pages += len(freed)
            self._resident[layer] -= len(freed)
            slot.masked_fill_(pages, -1)

    def _evict_oldest(self, layer: int, idle: torch.Tensor, n: int) -> None:
        """Free up to `n` slots of idle (resident, not kept) pages, the longest dropped first."""
        when = torch.where(idle, self.dropped_step[layer], 2**62).flatten()
        m = min(n, int(idle.sum()))
        if m:
            pick = torch.zeros_like(when, dtype=torch.bool)
            pick[when.topk(m, largest=False).indices] = True
            self._evict(layer, pick.view_as(idle))

    def _compact(self, layer: int, keep: torch.Tensor) -> None:
        """Shrink the layer's pool to its kept pages, a page per head and the slack (a device
        gather at re-rankings) once it is over twice the slack, so that its allocation follows
        what the heads keep. Idle pages fill the spare slots, the last dropped first."""
        _, B, H, *_ = self.shape
        slot = self.slot[layer]
        kept = (slot >= 0) & keep
        idle = (slot >= 0) & ~keep
        n, n_idle = torch.stack([kept.sum(), idle.sum()]).tolist()
        spare = B * H * (1 + self.spare_pages)
        cap = n + spare + int((n + spare) * self.pool_slack)
        if self.pool_k[layer].shape[0] <= n + spare + int(2 * (n + spare) * self.pool_slack):
            return
        if n_idle > spare:
            self._evict_oldest(layer, idle, n_idle - spare)
        resident = slot >= 0
        m = n + min(n_idle, spare)
        order = torch.cat([slot[kept], slot[resident & ~keep]])
        for pool in (self.pool_k, self.pool_v):
            t = pool[layer]
            new = t.new_empty(cap, *t.shape[1:])
            new[:m] = t[order]
            pool[layer] = new
        slot[kept] = torch.arange(n, device=self.device)
        slot[resident & ~keep] = torch.arange(n, m, device=self.device)
        self.free[layer] = list(range(cap - 1, m - 1, -1))
        self._resident[layer] = m

    def _reserve(self, layer: int, n: int) -> None:
        """Grow the layer's pool until `n` slots are free (plus one page per head), by at
        least `pool_slack` of its size."""
        free = self.free[layer]
        if len(free) >= n:
            return
        cap = self.pool_k[layer].shape[0]
        grow = max(n - len(free) + self.shape[1] * self.shape[2], int(cap * self.pool_slack))
        for pool in (self.pool_k, self.pool_v):
            t = pool[layer]
            pool[layer] = torch.cat([t, t.new_zeros(grow, *t.shape[1:])])
        free[:0] = range(cap + grow - 1, cap - 1, -1)  # new slots below the old free ones
