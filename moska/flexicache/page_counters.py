"""The fetch and eviction counters that the page store (`store.py`) and the engine hook
(`engine_hook.py`) both keep on the device: one place for the properties that read them
(each read waits on the device, so they are read only when asked)."""

from __future__ import annotations

import torch


class PageCounters:
    """Host -> pool page copies and evictions, as 0-d int64 device tensors set by the owner."""

    _fetched: torch.Tensor
    _evicted: torch.Tensor

    @property
    def fetched_pages(self) -> int:
        return int(self._fetched)

    @property
    def evicted_pages(self) -> int:
        return int(self._evicted)
