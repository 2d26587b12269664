"""The engine's per-head page lists kept from one FlexiCache step to the next (`HeadLists`),
so that a plain decode step (`PlainStep`) rebuilds nothing.

Why: the engine rebuilt every layer's keep masks, slot maps and head lists at every decode
step (about 130 small ops per layer from Python) and re-ranked some request almost every
step (each request at its own phase of r: requests prefilled in groups re-ranked in turn).
On the H200 at B = 38 that made a step 132 ms against 12 ms for the bench's page store,
whose plain steps only add a token to each list. Here, as in the store: a step that
rebuilds (`FlexiStep`) leaves the lists the next step reads (the deferred re-ranking's new
kept sets included), and the next step is plain when the batch is the same requests in
the same order, each one token longer, no re-ranking is due (the engine re-ranks every
request at the same steps, `FlexiEngine.clock`), no hand-off happened, and a request that
starts a page only appends it (pages are held until their next re-ranking,
`hold_unranked`, and the request's FlexiCache state does not change: `long_enough`). A
plain step adds one token to every list (one op for all layers), appends started pages
(one scatter for all layers) and then each layer is one `paged_decode_heads` call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from moska.flexicache.transfer import to_device

if TYPE_CHECKING:
    from moska.flexicache.engine_hook import FlexiEngine

WIDTH_QUANTUM = 32  # list widths are multiples of this many pages


def list_width(pages: int) -> int:
    """The width of the lists built over a block table of `pages` columns: room for at
    least one more page (started pages are appended in place), rounded up to
    `WIDTH_QUANTUM` so that it (and the plain steps' graph, keyed by it) changes once in
    that many pages, not at every re-ranking."""
    return -(-(pages + 1) // WIDTH_QUANTUM) * WIDTH_QUANTUM


class HeadLists:
    """Every layer's lists [L, B, Hkv, W] for the next step of requests `ids`, built by a
    rebuilding step at `seq_lens`, with its held pages `kept` [B, L, Hkv, W] (or None)."""

    def __init__(self, ids, seq_lens, n_layers, hkv, width, kept, hold: bool, dev) -> None:
        b = len(ids)
        self.ids, self.seq_lens = list(ids), list(seq_lens)
        self.tables = torch.zeros(n_layers, b, hkv, width, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(n_layers, b, hkv, dtype=torch.int32, device=dev)
        self.kept = kept  # the requests' held pages (their `_RequestState.kept` are views)
        self.hold = hold  # a started page is appended (pages leave only at re-rankings)
        self.kept_pages = torch.zeros((), dtype=torch.int64, device=dev)  # for the stats
        self.stable_heads = torch.zeros((), dtype=torch.int64, device=dev)
        self.heads = torch.arange(hkv, device=dev)

    def advance(
        self, eng: FlexiEngine, ids, block_tables, seq_lens, due_ok: bool = False
    ) -> PlainStep | None:
        """The next step's lists in place when it is plain (else None: rebuild); `due_ok`:
        also at a re-ranking (a deferred one reads them)."""
        cfg, bs = eng.cfg, eng.block_size
        if ids != self.ids or (eng.clock % cfg.rerank_interval == 0 and not due_ok):
            return None
        if any(n != m + 1 for n, m in zip(seq_lens, self.seq_lens)):
            return None
        width = self.tables.shape[-1]
        starts = [i for i, n in enumerate(seq_lens) if (n - 1) % bs == 0]
        for i in starts:
            n_pages = -(-seq_lens[i] // bs)
            if not self.hold or n_pages > width:
                return None
            if cfg.long_enough(n_pages) != cfg.long_enough(n_pages - 1):
                return None
        self.lens += 1  # every list: one token more (a started page: bs more, bs - 1 pad)
        if starts:
            self._append(eng, starts, block_tables, seq_lens)
        self.seq_lens = list(seq_lens)
        n_layers, b, hkv, _ = self.tables.shape
        eng._kept += self.kept_pages
        eng._total += n_layers * hkv * sum(-(-n // bs) for n in seq_lens)
        eng._stable += self.stable_heads
        eng._heads += n_layers * b * hkv
        return PlainStep(self.tables, self.lens, eng.flat_caches())

    def _append(self, eng: FlexiEngine, starts: list[int], block_tables, seq_lens) -> None:
        """The started pages of rows `starts` at the end of every head's list (all layers),
        held (`kept`) by the rows under FlexiCache."""
        bs, dev = eng.block_size, self.tables.device
        n_layers, _, hkv, _ = self.tables.shape
        pages = [(seq_lens[i] - 1) // bs for i in starts]
        rows, page = to_device(starts, dev), to_device(pages, dev)
        # the list's page count before the page: lens was (pages * bs) before the += 1
        col = ((self.lens[:, rows] - 1) // bs).long()  # [L, R, Hkv]
        block = block_tables[rows, page].long()  # [R]
        slot = block[:, None] * hkv + self.heads[None, :]  # [R, Hkv]
        lay = torch.arange(n_layers, device=dev)[:, None, None]
        slots = slot[None].expand(n_layers, -1, -1)
        if eng.slot_offsets is not None:  # global slots (`shared_slots.py`)
            slots = slots + eng.slot_offsets[:, None, None]
        self.tables.index_put_(
            (lay, rows[None, :, None], self.heads[None, None, :], col), slots.to(torch.int32)
        )
        self.kept_pages += len(starts) * n_layers * hkv
        if self.kept is not None:
            active = [j for j, i in enumerate(starts) if eng.cfg.long_enough(pages[j] + 1)]
            if active:
                sel = to_device(active, dev)
                self.kept[rows[sel], :, :, page[sel]] = True


class PlainStep:
    """A plain FlexiCache decode step: each layer reads its lists as they are and keeps its
    queries (`q_buf` [L, B, Hq, D]); at a deferred re-ranking of requests all ranked before,
    `rerank` (a `FlexiStep`) then ranks every layer with them after the forward (`finish`):
    the step itself reads what a plain step would, so it too replays from a graph."""

    def __init__(self, tables: torch.Tensor, lens: torch.Tensor, flat: Any = None) -> None:
        self.tables, self.lens = tables, lens
        self.flat = flat  # (K, V) caches as [L * N, bs, Hkv, D] for global slots, or None
        self.q_buf: torch.Tensor | None = None
        self.rerank: Any = None  # engine_step.FlexiStep (its `rank_after`)

    def attend(self, layer, q, k_cache, v_cache, decode_fn, sm_scale: float):
        if self.q_buf is None:
            self.q_buf = q.new_empty(self.tables.shape[0], *q.shape)
        self.q_buf[layer].copy_(q)
        if self.flat is not None:
            k_cache, v_cache = self.flat
        return decode_fn(
            q, k_cache, v_cache, self.tables[layer], self.lens[layer], sm_scale, slot_heads=True
        )

    def finish(self, k_caches, sm_scale: float) -> None:
        """After the forward: the deferred re-ranking, if due."""
        if self.rerank is not None:
            assert self.q_buf is not None, "the forward attended through this step"
            self.rerank.rank_after(self.q_buf, k_caches, sm_scale)
