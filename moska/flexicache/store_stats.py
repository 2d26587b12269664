"""The FlexiCache page store's counters and byte accounting (a mixin of `FlexiKV`,
`store.py`): the device counters read only when asked (each read waits on the device)."""

from __future__ import annotations

import torch

from moska.flexicache.config import FlexiCacheConfig
from moska.flexicache.page_counters import PageCounters
from moska.flexicache.transfer import FetchTimer


class StoreStats(PageCounters):
    cfg: FlexiCacheConfig
    shape: tuple[int, int, int, int, int, int]  # (L, B, H, P, bs, D)
    length: int
    host_k: torch.Tensor
    pool_k: list[torch.Tensor]
    pool_v: list[torch.Tensor]
    slot: torch.Tensor
    kmin: torch.Tensor
    kmax: torch.Tensor
    kmean: torch.Tensor
    top: torch.Tensor
    stable: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor
    _lens_base: torch.Tensor
    _peak: torch.Tensor
    _refetched: torch.Tensor
    _reused: torch.Tensor
    _timer: FetchTimer

    @property
    def peak_resident_pages(self) -> int:
        return int(self._peak)

    @property
    def refetched_pages(self) -> int:
        return int(self._refetched)

    @property
    def reused_pages(self) -> int:
        return int(self._reused)

    # ---- accounting ----
    def page_bytes(self) -> int:
        *_, bs, d = self.shape
        return 2 * bs * d * self.host_k.element_size()

    def full_kv_bytes(self) -> int:
        """A paged cache's bytes for these sequences at the current length."""
        L, B, H, _, bs, _ = self.shape
        return L * B * H * -(-self.length // bs) * self.page_bytes()

    def resident_pages(self) -> int:
        return int((self.slot >= 0).sum())

    def gpu_bytes(self) -> int:
        """Bytes this store holds on the device: the pools as allocated, summaries, tables."""
        pools = sum(t.numel() * t.element_size() for t in (*self.pool_k, *self.pool_v))
        meta = [self.slot, self.kmin, self.kmax, self.kmean, self.top, self.stable, self.tables]
        meta += [self.lens, self._lens_base]
        return pools + sum(t.numel() * t.element_size() for t in meta)

    def stable_fraction(self) -> float:
        return float(self.stable.float().mean())

    def fetch_seconds(self) -> float:
        """Time spent fetching since the last `reset_counters` (`time_fetch` on)."""
        return self._timer.seconds()

    def reset_counters(self) -> None:
        self._fetched.zero_()
        self._evicted.zero_()
        self._refetched.zero_()
        self._reused.zero_()
        self._timer.reset()
