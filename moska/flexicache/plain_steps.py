"""The FlexiCache page store's plain decode steps (a mixin of `FlexiKV`, `store.py`): the
new token written and the newest page's mean key indexed by the step's device position, so
that a plain step launches no work that depends on a host int (a CUDA graph of it replays
every plain step); after each step, a deferred re-ranking (`deferred.py`) and deferred
write-backs of filled pages (`defer_write_back`, set by a graph runner)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

from moska.flexicache import deferred
from moska.flexicache.config import FlexiCacheConfig
from moska.flexicache.transfer import PageWriteBack

if TYPE_CHECKING:
    from moska.flexicache.store import FlexiKV


class PlainSteps:
    cfg: FlexiCacheConfig
    shape: tuple[int, int, int, int, int, int]  # (L, B, H, P, bs, D)
    device: torch.device
    block_size: int
    length: int
    step: int
    centroid: bool
    slot: torch.Tensor
    kmean: torch.Tensor
    pool_k: list[torch.Tensor]
    pool_v: list[torch.Tensor]
    write_back: PageWriteBack
    defer_write_back: bool
    deferred_rerank: bool
    _compact_due: bool
    _page_pos: torch.Tensor
    _slot_pos: torch.Tensor
    _sm: float
    _page_ready: int  # a length whose page start `deferred.prepare_page_start` made

    def _write_token(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The new token's K/V [B, H, D] into its page's slots, and the page's mean key
        ("centroid"), indexed by the step's device position (`_page_pos`, `_slot_pos`): no
        host int in the launched work, so a plain step is capturable in a CUDA graph."""
        _, B, H, _, bs, D = self.shape
        cur = self.slot[layer].index_select(-1, self._page_pos).view(-1)  # [B * H] slots
        rows = cur * bs + self._slot_pos  # token rows of the pool viewed [N * bs, D]
        for pool, x in ((self.pool_k[layer], k), (self.pool_v[layer], v)):
            pool.view(-1, D).index_copy_(0, rows, x.reshape(B * H, D).to(pool.dtype))
        if self.centroid:  # the newest page's mean key, from its resident copy
            page = self.pool_k[layer].index_select(0, cur)[:, :, 0].float()  # [B * H, bs, D]
            upto = torch.arange(bs, device=self.device) <= self._slot_pos
            total = torch.where(upto[None, :, None], page, 0.0).sum(1)
            mean = (total / (self._slot_pos + 1)).view(B, H, 1, D).to(self.kmean.dtype)
            self.kmean[layer].index_copy_(2, self._page_pos, mean)
        return cur

    def plain_step(self) -> bool:
        """Whether the step just begun is plain: no re-ranking, no page started (unless
        prepared by the step before, deferred mode), no pending
        compaction, and a page filled only under `defer_write_back`: its attention work reads
        only device tensors written in place (a CUDA graph of it stays valid while
        `pool_version` is unchanged)."""
        s = (self.length - 1) % self.block_size
        r = self.cfg.rerank_interval
        ends = s == self.block_size - 1
        ranks = self.step % r == 0 and not self.deferred_rerank
        starts = s == 0 and self._page_ready != self.length
        ok = self.step > 0 and not ranks and not starts and (self.defer_write_back or not ends)
        return ok and self.centroid and not self._compact_due

    def finish_step(self) -> None:
        """After each decode forward: a deferred re-ranking, then deferred write-backs."""
        store = cast("FlexiKV", self)
        if deferred.due(store):
            deferred.apply_rerank(store, self._sm, deferred.spread_layers(store))
        self.queue_write_backs()
        if self.deferred_rerank and self.length % self.block_size == 0 and self.step >= 0:
            deferred.prepare_page_start(store)  # the next step starts a page: plain now

    def queue_write_backs(self) -> None:
        """After a step that filled a page under `defer_write_back` (a CUDA graph's replay):
        each layer's page to the host copy, as the step's `attend` would have queued it."""
        if not self.defer_write_back or (self.length - 1) % self.block_size != self.block_size - 1:
            return
        p = (self.length - 1) // self.block_size
        for layer in range(self.shape[0]):
            cur = self.slot[layer].index_select(-1, self._page_pos).view(-1)
            self.write_back.queue(layer, p, self.pool_k[layer], self.pool_v[layer], cur)
