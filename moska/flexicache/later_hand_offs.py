"""Later hand-offs of an engine request (a mixin of `FlexiEngine`, `engine_hook.py`): the
full pages that left the recent window since the request's last hand-off go to its host copy
(kept ones to its pool), their blocks back to the allocator.

Why here, and when: they are made at the deferred re-ranking after the forward
(`extend_after`, called by `FlexiStep.rank_after`, which rebuilds every layer's lists in
one batch anyway), at most `extend_cap` per re-ranking, the most overdue first, or at an
eager step (`FlexiEngine.begin`). Made in `begin` they made their step eager (every layer's
lists rebuilt, ~130 ops per layer) and a wave of requests in phase made them together: on
the H200 100-280 ms steps, 53-64 % of the wall with the re-rankings (session 16)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from moska.flexicache.config import FlexiCacheConfig


class LaterHandOffs:
    cfg: FlexiCacheConfig
    blocks: Any
    cache: Any
    block_size: int
    extend_pages: int
    extensions: int
    extensions_after: int
    min_saving: int
    released_blocks: int
    _evicted: torch.Tensor

    # FlexiEngine's own (engine_hook.py): its methods come first in the MRO

    def _pool_need(self, n_stable: list[int], pages: int) -> int:
        raise NotImplementedError  # FlexiEngine's

    def _reserve(self, rid: str, table: list[int], need: int, upto: int) -> Any:
        raise NotImplementedError  # FlexiEngine's

    def _keep(self, st: Any, n_pages: int, pages: int) -> torch.Tensor:
        raise NotImplementedError  # FlexiEngine's

    def _extend(self, rid: str, st: Any, seq_len: int) -> None:
        """A later hand-off: the full pages that left the recent window since the last one
        go to the host copy (kept ones to the pool), their blocks back to the allocator, once
        there are `extend_pages` of them (stable heads keep top-K + recent pages on the
        device however long the request decodes)."""
        cfg, bm, off = self.cfg, self.blocks, st.off
        assert off is not None
        n_pages = -(-seq_len // self.block_size)
        pages = n_pages - cfg.recent_pages
        if pages - off.pages < max(self.extend_pages, st.next_extend - off.pages):
            return
        more = self._pool_need(off.n_stable, pages) - len(off.pool)
        if pages - off.pages - max(more, 0) < self.min_saving:
            st.next_extend = pages + self.extend_pages  # no saving now: try again later
            return
        table = bm.block_table(rid)[off.pages : pages]
        if -1 in table:
            return
        got = self._reserve(rid, table, max(more, 0), pages)
        if got is None:
            return
        pool, released = got
        keep = self._keep(st, n_pages, pages)
        self._evicted += off.extend(self.cache.k, self.cache.v, table, keep, pool)
        self.released_blocks += released or bm.release_blocks(rid, pages)
        self.extensions += 1

    def extend_after(self, request_ids: list[str], states, seq_lens: list[int]) -> bool:
        """Later hand-offs at a deferred re-ranking after the forward (`FlexiStep.rank_after`,
        which then rebuilds every list in one batch): the requests with the most pages
        waiting first, at most `extend_cap` of them, so that requests prefilled together
        (in phase) do not all hand off at the same re-ranking. Why: each later hand-off
        made its step eager (every layer's lists rebuilt, ~130 ops per layer), and a wave
        of requests in phase made theirs at once (100-280 ms steps on the H200). Returns
        whether any was made."""
        if self.blocks is None:
            return False
        bs, recent = self.block_size, self.cfg.recent_pages
        waiting = []
        for i, st in enumerate(states):
            if st.off is not None:
                pages = -(-seq_lens[i] // bs) - recent
                if pages - st.off.pages >= max(self.extend_pages, st.next_extend - st.off.pages):
                    waiting.append((st.off.pages - pages, i))
        before = self.extensions
        for _, i in sorted(waiting)[: self.extend_cap(len(states))]:
            self._extend(request_ids[i], states[i], seq_lens[i])
        self.extensions_after += self.extensions - before
        return self.extensions > before

    def extend_cap(self, batch: int) -> int:
        """Later hand-offs per re-ranking: enough for `batch` requests that each make one
        per `extend_pages` pages (one page per `block_size` steps), with room to catch up."""
        per = -(-batch * self.cfg.rerank_interval // (self.extend_pages * self.block_size))
        return max(1, 2 * per)
