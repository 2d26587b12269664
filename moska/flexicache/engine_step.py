"""One engine decode step under FlexiCache (`FlexiEngine.begin`): per layer, the requests'
re-rankings and the per-KV-head page lists the paged decode kernel reads.

Re-ranking (`FlexiCacheConfig.rerank`): "deferred" (the default, the configuration measured
on the H200: 1.19x full KV's tokens/s at 64 % less GPU KV) ranks a due layer with the query
of the step just run and reads the pages it picks from the next step on, as the bench's
page store does (`deferred.py`): the step itself reads the pages kept before, and an
offloaded request's fetches for the new ones are issued after the layer's attention. A
request's first FlexiCache step ranks in the step (nothing is kept yet). With
`hold_unranked` a page that leaves the recent window stays kept until the next re-ranking
ranks it (each request's kept pages, `_RequestState.kept`, are or-ed into the step's; a
request too short for FlexiCache holds none); a hand-off or later one moves held pages to
the pool with the kept ones (`FlexiEngine._keep`, the pool sized for them).
"step": a due request's new pages are read in the same step (fetched before the layer's
attention). Every request re-ranks at the same steps (`FlexiEngine.clock` % r); a
FlexiStep runs eagerly and leaves the lists the next step reads (`plain_lists.HeadLists`),
so that the steps between re-rankings are plain (`PlainStep`, replayed from a CUDA graph:
`engine_graphs.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moska.flexicache import batched_scores, policy, shared_slots
from moska.flexicache.offload import OffloadBatch
from moska.flexicache.offload_sync import layer_chunks, sync_layers
from moska.flexicache.plain_lists import HeadLists, list_width
from moska.flexicache.transfer import to_device

if TYPE_CHECKING:
    from moska.flexicache.engine_hook import FlexiEngine


def _width(kept: torch.Tensor | None, shape: tuple[int, int], p: int, dev) -> torch.Tensor:
    """A request's kept pages [L, Hkv, p] (False past what it had)."""
    if kept is None:
        return torch.zeros(*shape, p, dtype=torch.bool, device=dev)
    if kept.shape[-1] >= p:
        return kept[..., :p]
    return F.pad(kept, (0, p - kept.shape[-1]))


class FlexiStep:
    """One decode step's per-head page lists, built layer by layer."""

    def __init__(
        self,
        eng: FlexiEngine,
        states,
        block_tables: torch.Tensor,
        seq_lens,
        rows=None,
        ids=None,
    ) -> None:
        cfg, bs, dev = eng.cfg, eng.block_size, eng.device
        self.eng = eng
        self.states = states
        self.ids, self.seq_list = ids, list(seq_lens)  # for later hand-offs (`rank_after`)
        self.rows = rows  # query rows in a mixed step (`patch`), None: every row
        # released blocks: -1; a decode-only step's lists are as wide as the next steps'
        # (`HeadLists`: started pages appended in place; `list_width`)
        width = list_width(block_tables.shape[1]) if rows is None else block_tables.shape[1]
        self.block_tables = F.pad(
            block_tables.long().clamp(min=0), (0, width - block_tables.shape[1])
        )
        self.offs = [(i, st.off) for i, st in enumerate(states) if st.off is not None]
        self.off_rows = to_device([i for i, _ in self.offs], dev)
        n_pages = [-(-s // bs) for s in seq_lens]
        r, self.deferred = cfg.rerank_interval, cfg.rerank == "deferred"
        # every request re-ranks at the same steps (one ranking step in r, not one per
        # request's phase); a request that joined since keeps every page until then
        self.due = [eng.clock % r == 0] * len(states)
        # ranked in the step (read now): "step" mode, or a request's first ranking
        self.now = [d and not (self.deferred and st.ranked) for d, st in zip(self.due, states)]
        self.all_now = all(n == d for n, d in zip(self.now, self.due))
        for st, due in zip(states, self.due):
            st.ranked += due
        due_offs = [j for j, (i, _) in enumerate(self.offs) if self.due[i]]
        self.due_rows = to_device([self.offs[j][0] for j in due_offs], dev)
        # their slot maps, padded and stacked once per step (not per request and layer)
        self.batch = None
        if self.offs:
            self.batch = eng._batch = OffloadBatch([off for _, off in self.offs], due_offs)
        # through pinned memory: torch.tensor(..., device="cuda") waits for the device
        self.due_t = to_device(self.due, dev, torch.bool)
        self.now_t = self.due_t if self.all_now else to_device(self.now, dev, torch.bool)
        self.active = to_device([cfg.long_enough(n) for n in n_pages], dev, torch.bool)
        self.n_pages = to_device(n_pages, dev)
        self.seq_lens = to_device(seq_lens, dev)
        # every request's ranking state, gathered once per step (not per layer)
        self.top = torch.stack([st.top for st in states])  # [B, L, Hkv, K]
        self.stable = torch.stack([st.stable for st in states])  # [B, L, Hkv]
        for i, st in enumerate(states):  # a ranking stores a layer's for every request at once
            st.top, st.stable = self.top[i], self.stable[i]
        # released pages' (row, page) in the order of the offloaded requests' mean keys
        rows_pages = [(i, j) for i, off in self.offs for j in range(off.pages)]
        # pages every row has released (their mean keys on the device): not read at ranking
        self.p0 = min(0 if st.off is None else st.off.pages for st in states)
        if any(self.due) and rows_pages and cfg.rank_by == "centroid":
            self.k_rows = to_device([i for i, _ in rows_pages], dev)
            self.k_pages = to_device([j for _, j in rows_pages], dev)
        # what every layer shares: window masks, slot map, lists' pads, pages (once per step)
        p = self.block_tables.shape[1]
        self.windows = policy.window_masks(self.n_pages, cfg.recent_pages, p, cfg.sink_pages)
        self.cand = policy.candidates(self.n_pages, cfg.recent_pages, p, cfg.sink_pages)
        hkv = eng.num_kv_heads
        heads = torch.arange(hkv, device=dev)
        self.slots = self.block_tables[:, None, :] * hkv + heads[None, :, None]  # [B, Hkv, P]
        self.pad = policy.last_page_pad(self.seq_lens, bs)
        self.total = self.n_pages.sum() * hkv
        # held pages: each request's kept pages, [B, L, Hkv, P], its own state a view of it
        self.kept: torch.Tensor | None = None
        hold = self.deferred and cfg.hold_unranked
        if hold:
            shape = (eng.num_layers, hkv)
            self.kept = torch.stack([_width(st.kept, shape, p, dev) for st in states])
            for i, st in enumerate(states):
                st.kept = self.kept[i]
        # the lists the next step reads, if plain (decode-only steps)
        self.lists = None
        if rows is None:
            self.lists = HeadLists(ids, seq_lens, eng.num_layers, hkv, p, self.kept, hold, dev)
        eng._lists = self.lists

    def _rank(self, layer, q, k_cache, top, stable, sm_scale: float):
        """The due requests' new top-K and classes of `layer` (others: as they were)."""
        cfg = self.eng.cfg
        scores = self._scores(layer, q, k_cache, sm_scale)
        new_top, new_stable, _ = policy.rerank(scores, self.cand, top, cfg.threshold)
        if self.eng.force_stable is not None:  # a bench's classes (a random model's churn)
            new_stable = new_stable | self.eng.force_stable[layer]
        if self.offs:  # head classes fixed once offloaded (the pool's size)
            new_stable[self.off_rows] = stable[self.off_rows]
        top = torch.where(self.due_t[:, None, None], new_top, top)
        stable = torch.where(self.due_t[:, None], new_stable, stable)
        return top, stable  # `attend` stores them (each request's state a view)

    def _scores(self, layer: int, q, k_cache, sm_scale: float) -> torch.Tensor:
        """[B, Hkv, P] page scores of `layer` for the queries `q` [B, Hq, D]."""
        cfg = self.eng.cfg
        if cfg.rank_by == "bound":
            keys = k_cache[self.block_tables]  # [B, P, bs, Hkv, D]
            kmin, kmax = policy.page_summaries(keys, self.seq_lens)
            scores = policy.page_scores(q, kmin, kmax)
        elif cfg.rank_by == "centroid":
            kmean, count = self._centroids(k_cache)
            if self.offs:  # released pages: their mean keys kept on the device (one copy)
                src = torch.cat([off.kmean[layer] for _, off in self.offs], 1)  # [Hkv, S, D]
                kmean[self.k_rows, :, self.k_pages] = src.transpose(0, 1)
            scores = policy.centroid_mass(q, kmean, count, sm_scale)
        else:
            keys = k_cache[self.block_tables].permute(0, 3, 1, 2, 4)  # [B, Hkv, P, bs, D]
            scores = policy.page_mass(q, keys, self.seq_lens, sm_scale)
        if self.eng.score_hook is not None:  # a bench's rankings (a random model's churn)
            scores = self.eng.score_hook(layer, scores)
        return scores

    def _centroids(self, k_cache) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean keys [B, Hkv, P, D], tokens [B, P]) of every page from the cache, but the
        pages before `p0` (every row's are released: their mean keys are `Offload.kmean`,
        put in by the caller; all full pages): only the pages from p0 on are read."""
        p0, bs = self.p0, self.eng.block_size
        keys = k_cache[self.block_tables[:, p0:]].permute(0, 3, 1, 2, 4)
        tail, count = policy.page_centroids(keys, self.seq_lens - p0 * bs)
        if not p0:
            return tail, count
        b, hkv, _, d = tail.shape
        kmean = tail.new_empty(b, hkv, p0 + tail.shape[2], d)
        kmean[:, :, p0:] = tail
        return kmean, F.pad(count, (p0, 0), value=float(bs))

    def _sync(self, layer: int, keep: torch.Tensor) -> None:
        """The due offloaded requests' fetches and evictions of `layer` for `keep`, at once."""
        eng = self.eng
        assert self.batch is not None
        fetched, evicted = self.batch.sync(layer, keep[self.due_rows], eng.cache.k, eng.cache.v)
        eng._fetched += fetched
        eng._evicted += evicted

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # [B, Hq, D]
        k_cache: torch.Tensor,  # [blocks, bs, Hkv, D]
        v_cache: torch.Tensor,
        decode_fn: Callable,
        sm_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eng = self.eng
        top, stable = self.top[:, layer], self.stable[:, layer]  # [B, Hkv, K], [B, Hkv]
        read_top, read_stable = top, stable
        after = None  # deferred: the pages kept from the next step on
        if any(self.due):
            new_top, new_stable = self._rank(layer, q, k_cache, top, stable, sm_scale)
            if self.all_now:
                read_top, read_stable = new_top, new_stable
            else:
                read_top = torch.where(self.now_t[:, None, None], new_top, top)
                read_stable = torch.where(self.now_t[:, None], new_stable, stable)
                after = policy.keep_mask_windows(new_top, new_stable, self.active, self.windows)
            # every request's state (views of these), after the reads above in stream order
            self.top[:, layer], self.stable[:, layer] = new_top, new_stable
        keep = policy.keep_mask_windows(read_top, read_stable, self.active, self.windows)
        if self.kept is not None:  # pages held until their next re-ranking
            keep = keep | self.kept[:, layer]
        b = self.batch
        if b is not None and b.due and after is None:  # ranked in the step: fetched first
            self._sync(layer, keep)
        tables, lens = policy.head_lists(
            keep, self._slots(layer), self.seq_lens, eng.block_size, self.pad
        )
        stable_now = (read_stable & self.active[:, None]).sum()
        eng._kept += keep.sum()
        eng._total += self.total
        eng._stable += stable_now
        eng._heads += read_stable.numel()
        flat = eng.flat_caches()
        if flat is not None:  # global slots (`shared_slots.py`): the cache as one tensor
            k_cache, v_cache = flat
        out = decode_fn(q, k_cache, v_cache, tables, lens, sm_scale, slot_heads=True)
        if after is not None:  # deferred: read from the next step on
            if b is not None and b.due:  # issued behind this step's reads, in stream order
                self._sync(layer, after)
            keep = torch.where(self.due_t[:, None, None], after, keep)
            stable_now = (new_stable & self.active[:, None]).sum()
            tables, lens = policy.head_lists(
                keep, self._slots(layer), self.seq_lens, eng.block_size, self.pad
            )
        self._leave(layer, keep, tables, lens, stable_now)
        return out

    def _leave(self, layer: int, keep, tables, lens, stable_now) -> None:
        """`layer`'s held pages and the lists the next step reads if it is plain."""
        if self.kept is not None:  # a row not yet under FlexiCache (short) holds nothing
            self.kept[:, layer] = keep & self.active[:, None, None]
        if self.lists is not None:
            self.lists.tables[layer].copy_(tables)
            self.lists.lens[layer].copy_(lens)
            self.lists.kept_pages += keep.sum()
            self.lists.stable_heads += stable_now

    def rank_after(self, q_buf: torch.Tensor, k_caches, sm_scale: float) -> None:
        """A deferred re-ranking of requests all ranked before, after a forward that read
        the lists kept from the last step (a `PlainStep`, maybe replayed from a graph, its
        queries in `q_buf` [L, B, Hq, D]): each layer's scores, then top-K, classes, keep
        masks and lists of every layer in one batch of ops ((row, layer) pairs as rows, as
        the bench store's `deferred.apply_rerank`), the new kept pages of all layers fetched
        at once (`offload_sync.sync_layers`), all left for the next step."""
        eng, cfg = self.eng, self.eng.cfg
        n_layers = eng.num_layers
        scores = batched_scores.scores_all(self, q_buf, k_caches, sm_scale)  # [B, L, Hkv, P]
        b, _, hkv, p = scores.shape
        rows = b * n_layers  # row i * L + layer
        rep = lambda t: t.repeat_interleave(n_layers, 0)  # per row -> per (row, layer)
        top, stable, _ = policy.rerank(
            scores.view(rows, hkv, p), rep(self.cand), self.top.view(rows, hkv, -1), cfg.threshold
        )
        top, stable = top.view(self.top.shape), stable.view(b, n_layers, hkv)
        if eng.force_stable is not None:  # a bench's classes (a random model's churn)
            stable = stable | eng.force_stable[None]
        if self.offs:  # head classes fixed once offloaded (the pool's size)
            stable[self.off_rows] = self.stable[self.off_rows]
        top = torch.where(self.due_t[:, None, None, None], top, self.top)
        stable = torch.where(self.due_t[:, None, None], stable, self.stable)
        valid, window = self.windows
        keep = policy.keep_mask_windows(
            top.view(rows, hkv, -1), stable.view(rows, hkv), rep(self.active),
            (rep(valid), rep(window)),
        ).view(b, n_layers, hkv, p)  # fmt: skip
        if self.offs and eng.extend_after(self.ids, self.states, self.seq_list):
            # later hand-offs, from the ranking the step read (its kept pages are resident;
            # the new ones are fetched below), then the slot maps with the pages they added
            due_offs = [j for j, (i, _) in enumerate(self.offs) if self.due[i]]
            self.batch = eng._batch = OffloadBatch([off for _, off in self.offs], due_offs)
        self.top.copy_(top)  # every request's state (views), after the reads above
        self.stable.copy_(stable)
        bat = self.batch
        slots = self.slots[:, None].expand(b, n_layers, hkv, p)
        if eng.slot_offsets is not None:  # global slots (`shared_slots.py`)
            slots = slots + eng.slot_offsets[None, :, None, None]
        if bat is not None:
            if bat.due and eng.slot_offsets is not None:  # every layer at once
                kp = keep[self.due_rows]
                fetched, evicted = shared_slots.sync_all(bat, kp, eng.cache.k, eng.cache.v)
                eng._fetched += fetched
                eng._evicted += evicted
            elif bat.due:
                for part in layer_chunks(bat, n_layers):
                    kp = keep[self.due_rows, part.start : part.stop]
                    fetched, evicted = sync_layers(bat, kp, part, eng.cache.k, eng.cache.v)
                    eng._fetched += fetched
                    eng._evicted += evicted
            slots = slots.clone()  # released pages in the requests' pool slots
            old = slots[self.off_rows, :, :, : bat.pm]
            on = bat.cols[:, None, None, :]
            slots[self.off_rows, :, :, : bat.pm] = torch.where(on, bat.slot, old)
        tables, lens = policy.head_lists(
            keep.view(rows, hkv, p), slots.reshape(rows, hkv, p), rep(self.seq_lens),
            eng.block_size, rep(self.pad),
        )  # fmt: skip
        active = self.active[:, None, None]
        if self.kept is not None:  # a row not yet under FlexiCache (short) holds nothing
            self.kept.copy_(keep & active[..., None])
        lists = self.lists
        assert lists is not None  # a decode-only step's
        lists.tables.copy_(tables.view(b, n_layers, hkv, p).transpose(0, 1))
        lists.lens.copy_(lens.view(b, n_layers, hkv).transpose(0, 1))
        lists.kept_pages += keep.sum()
        lists.stable_heads += (stable & active).sum()

    def finish(self, k_caches, sm_scale: float) -> None:
        """After the forward (`PlainStep.finish`'s counterpart): nothing left to do."""

    def _slots(self, layer: int) -> torch.Tensor:
        """[B, Hkv, P] slots of every page of `layer`: released pages in the requests'
        pool slots."""
        b, offs = self.batch, self.eng.slot_offsets
        base = self.slots if offs is None else self.slots + offs[layer]
        if b is None:
            return base
        slots = base.clone()
        part = slots[self.off_rows, :, : b.pm]
        on = b.cols[:, None, :]
        slots[self.off_rows, :, : b.pm] = torch.where(on, b.slot[:, layer], part)
        return slots

    def patch(self, layer, q, o, lse, k_cache, v_cache, decode_fn, sm_scale):
        """A mixed step: replace the offloaded requests' decode rows of (o, lse)."""
        o_r, lse_r = self.attend(layer, q[self.rows], k_cache, v_cache, decode_fn, sm_scale)
        o[self.rows], lse[self.rows] = o_r.to(o.dtype), lse_r.to(lse.dtype)
        return o, lse
