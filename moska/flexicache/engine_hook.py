"""FlexiCache in the engine's decode steps (`--flexicache`, EngineConfig.flexicache).

The runner asks `FlexiEngine.begin` for a `FlexiStep` (`engine_step.py`; between
re-rankings a `PlainStep` over the last step's lists, `plain_lists.py`) on every
decode-only step (`begin_mixed` on a step with prefills: offloaded requests' decode rows
only); the attention backend then calls `FlexiStep.attend` per layer instead of the plain
paged decode: per request and KV head it re-ranks every R engine steps (every request at
the same steps, `clock`) (by attention mass
estimated from page mean keys, exact mass, or Quest bounds; by default deferred: the pages
picked are read from the next step on, and a page leaving the recent window is held until
the next re-ranking, `FlexiCacheConfig.rerank`, `hold_unranked`), classifies the head, and
reads only the head's kept pages through `paged_decode_heads`. Requests keep their state
across steps by request id; `release` drops it.

Memory is real once a request is classified (its second ranking): `begin` hands the request's
full pages before the recent window to FlexiCache (`Offload`): their K/V go to host memory
(pinned on CUDA), each head's kept pages (a stable head: top-K and sink pages; an unstable
head: all) go to a per-head page pool carved out of the block cache (blocks the request
reserves from the block manager; a page of head h may sit in any head's slice of a pool
block: `paged_decode_heads(slot_heads=True)`), and the request's blocks for those pages are
released to the block allocator (`BlockManager.release_blocks`), so the scheduler admits
more. After the hand-off the head classes stay fixed (the pool is sized for them); stable
heads re-rank every R steps and fetch promoted pages from the host copy into free pool slots
(with `slots=layer` a dropped page keeps its slot until a fetch needs it: hysteresis; with
`slots=shared`, the default, it leaves its slot at once: `shared_slots.py`). `BlockManager.free`
(finish, abort, preemption) releases the pool blocks and tells `release`, which drops the
host copy. Pages that leave the recent window after the hand-off follow once there are
`extend_pages` of them (`_extend`, `Offload.extend`: the pool grows by the blocks the
unstable heads need for them), so a long decode keeps only top-K + recent pages of its stable
heads on the device. Offload needs rank_by="centroid" (page mean keys of host pages stay on
the device). Not yet: P/D transfer and SemShareKV with FlexiCache are untested (they read a
request's blocks at prefill, before its hand-off).

Waits on the device (`host_reads.py` counts them; `moska/bench/flexicache_engine_reads.py`):
a re-ranking step reads nothing back: every offloaded request's slot allocation, evictions
and fetches of a layer are issued at once (`OffloadBatch.sync`: slots picked on the device
from the slot maps, fetch lists padded to a bound the host knows, pages read from the pinned
host copies in place), and later hand-offs size their pools from the head classes read at
the first one. A step with first hand-offs reads their head classes once (one read for all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moska.flexicache import policy, shared_slots
from moska.flexicache.config import FlexiCacheConfig
from moska.flexicache.engine_step import FlexiStep
from moska.flexicache.host_pool import HostPool, make_host_pool
from moska.flexicache.later_hand_offs import LaterHandOffs
from moska.flexicache.offload import Offload, OffloadBatch, pool_blocks_needed
from moska.flexicache.page_counters import PageCounters
from moska.flexicache.plain_lists import HeadLists, PlainStep
from moska.flexicache.transfer import HOST_WRITES, to_device

__all__ = ["FlexiEngine", "FlexiStep", "flexi_engine"]


@dataclass
class _RequestState:
    top: torch.Tensor  # [L, Hkv, K] int64, -1: not ranked yet
    stable: torch.Tensor  # [L, Hkv] bool
    steps: int = 0  # decode steps attended through FlexiCache
    ranked: int = 0  # re-rankings done (classified from the second one on)
    off: Offload | None = None  # its pages on the host and in the pool, once handed off
    keep_all: bool = False  # a hand-off would save no block: never tried again
    next_extend: int = 0  # pages before the recent window at which a later hand-off is tried
    n_stable: list[int] | None = None  # stable heads per layer, read at `ranked` (hand-off)
    n_stable_at: int = -1
    kept: torch.Tensor | None = None  # [L, Hkv, >= pages] read at its last step (hold_unranked)


class FlexiEngine(PageCounters, LaterHandOffs):
    def __init__(
        self,
        cfg: FlexiCacheConfig,
        num_layers: int,
        num_kv_heads: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self.device = device
        self.requests: dict[str, _RequestState] = {}
        # kept / total (request, layer, head) pages over every FlexiCache step, on the device
        self._kept = torch.zeros((), dtype=torch.int64, device=device)
        self._total = torch.zeros((), dtype=torch.int64, device=device)
        self._stable = torch.zeros((), dtype=torch.int64, device=device)
        self._heads = torch.zeros((), dtype=torch.int64, device=device)
        self.blocks: Any = None  # the engine's BlockManager, once `attach`ed: real offload
        self.host_pool: HostPool | None = None  # every hand-off's host copy (`attach`)
        self.slot_offsets: torch.Tensor | None = None  # [L], `slots=shared` once attached
        self.cache: Any = None  # the engine's PagedKVCache
        self.min_saving = 1  # blocks a hand-off must free beyond its pool (tests: 0)
        self.extend_pages = 8  # pages past the last hand-off that make a later one (tests: 1)
        self.extensions = 0
        self.extensions_after = 0  # of them made at a re-ranking after the forward
        self.released_blocks = 0
        self.released_first = 0  # hand-offs whose pool took blocks the request released
        self.offloads = 0
        self.mixed_steps = 0  # steps with prefills that patched offloaded decode rows
        # re-rankings' host -> pool copies and evictions, every request's, on the device
        self._fetched = torch.zeros((), dtype=torch.int64, device=device)
        self._evicted = torch.zeros((), dtype=torch.int64, device=device)
        self._batch: OffloadBatch | None = None  # the last step's, its slot maps to write back
        self.clock = 0  # FlexiCache steps begun: every request re-ranks when clock % r == 0
        self._lists: HeadLists | None = None  # the lists the next step reads if plain
        self.plain_steps = 0  # steps that rebuilt nothing (`HeadLists.advance`)
        self.rerank_reads_kept = 0  # deferred re-rankings that read the kept lists
        # [L, Hkv] bool: heads stable regardless of their overlap (benches on random models,
        # as the page store's `force_stable`); None: classified by the threshold only
        self.force_stable: torch.Tensor | None = None
        # (layer, scores [B, Hkv, P]) -> scores: a bench's rankings (a random model's churn,
        # as the speed bench's `--churn`); None: the scores as estimated
        self.score_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None

    def attach(self, block_manager, cache) -> None:
        """Offload for real: classified requests hand their old pages to the host and
        release their blocks to `block_manager` (centroid ranking only)."""
        if self.cfg.rank_by != "centroid":
            return
        self.blocks, self.cache = block_manager, cache
        block_manager.free_listeners.append(self.release)
        self.host_pool = make_host_pool(self.cfg, cache.k, self.device)
        if self.cfg.shared_slots:  # table pages' slots made global (`shared_slots.py`)
            n_blocks = cache.k.shape[1]
            self.slot_offsets = shared_slots.layer_offsets(
                self.num_layers, n_blocks, self.num_kv_heads, self.device
            )

    def flat_caches(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(K, V) caches as [L * N, bs, Hkv, D] when slots are global (`slots=shared`)."""
        if self.slot_offsets is None:
            return None
        return shared_slots.flat(self.cache.k), shared_slots.flat(self.cache.v)

    def _pool_need(self, n_stable: list[int], pages: int) -> int:
        """Pool blocks for `pages` offloaded pages with `n_stable` stable heads per layer."""
        fn = shared_slots.blocks_needed if self.slot_offsets is not None else pool_blocks_needed
        return fn(self.cfg, n_stable, self.num_kv_heads, pages, self._held)

    def begin(
        self,
        request_ids: list[str],
        block_tables: torch.Tensor,  # [B, P] int32 on the device
        seq_lens: list[int],
        rows: torch.Tensor | None = None,  # their query rows in a mixed step
    ) -> FlexiStep | PlainStep:
        if self._batch is not None:  # the last step's re-rankings into each request's map
            self._batch.flush()
            self._batch = None
        lists, self._lists = self._lists, None
        states = []
        for rid in request_ids:
            st = self.requests.get(rid)
            if st is None:
                top = torch.full(
                    (self.num_layers, self.num_kv_heads, self.cfg.top_k_pages),
                    -1,
                    dtype=torch.int64,
                    device=self.device,
                )
                st = self.requests[rid] = _RequestState(
                    top, torch.zeros_like(top[..., 0], dtype=torch.bool)
                )
            states.append(st)
        moved = self.offloads
        if self.blocks is not None:
            self._read_classes([st for st, n in zip(states, seq_lens) if self._may_hand_off(st, n)])
            for i, (rid, st) in enumerate(zip(request_ids, states)):
                if self._may_hand_off(st, seq_lens[i]):
                    self._hand_off(rid, st, seq_lens[i])
        step: FlexiStep | PlainStep | None = None
        # later hand-offs wait for a re-ranking after the forward (`extend_after`) or an
        # eager step: a plain step between re-rankings stays plain (replayed from a graph)
        if lists is not None and rows is None and moved == self.offloads:
            step = lists.advance(self, request_ids, block_tables, seq_lens)
            if step is not None:
                self._lists = lists
                self.plain_steps += 1
            elif self._reads_kept_lists(states):  # a deferred re-ranking after the forward
                step = lists.advance(self, request_ids, block_tables, seq_lens, due_ok=True)
                if step is not None:
                    step.rerank = FlexiStep(self, states, block_tables, seq_lens, None, request_ids)
                    self.rerank_reads_kept += 1
        if step is None:
            if self.blocks is not None:
                for i, (rid, st) in enumerate(zip(request_ids, states)):
                    if st.off is not None:
                        self._extend(rid, st, seq_lens[i])
            step = FlexiStep(self, states, block_tables, seq_lens, rows, request_ids)
        self.clock += 1
        for st in states:
            st.steps += 1
        return step

    def _reads_kept_lists(self, states: list[_RequestState]) -> bool:
        """A due deferred re-ranking whose requests were all ranked before reads the lists
        kept from the last step (the pages it picks are read from the next step on)."""
        cfg = self.cfg
        due = self.clock % cfg.rerank_interval == 0
        return due and cfg.rerank == "deferred" and all(st.ranked for st in states)

    def begin_mixed(
        self, request_ids, block_tables, seq_lens, cu_q, decoding: list[bool]
    ) -> FlexiStep | None:
        """A step with prefills: a FlexiStep over its decode rows (one token of a request
        that has sampled), or None. They attend as in a decode-only step, so a server that
        always has a prefill in flight still ranks, hands off and reads head-aware (and an
        offloaded request's old blocks are released: plain attention would read freed ones)."""
        pick = [i for i in range(len(request_ids)) if decoding[i] and cu_q[i + 1] - cu_q[i] == 1]
        if not pick:
            return None
        rows = to_device([cu_q[i] for i in pick], self.device)
        self.mixed_steps += 1
        step = self.begin(
            [request_ids[i] for i in pick],
            block_tables[to_device(pick, block_tables.device)],
            [seq_lens[i] for i in pick],
            rows,
        )
        assert isinstance(step, FlexiStep)  # a mixed step's rows build their lists
        return step

    def _may_hand_off(self, st: _RequestState, seq_len: int) -> bool:
        n_pages = -(-seq_len // self.block_size)
        return (
            st.off is None and st.ranked >= 2 and not st.keep_all and self.cfg.long_enough(n_pages)
        )

    def _read_classes(self, states: list[_RequestState]) -> None:
        """The stable heads per layer of the requests that may hand off now and were
        re-ranked since they were last read: one host read for all of them (their pool's
        size; the classes stay fixed after the hand-off)."""
        todo = [st for st in states if st.n_stable_at != st.ranked]
        if not todo:
            return
        counts = torch.stack([st.stable.sum(1) for st in todo]).tolist()  # one wait
        for st, n in zip(todo, counts):
            st.n_stable, st.n_stable_at = n, st.ranked

    def _hand_off(self, rid: str, st: _RequestState, seq_len: int) -> None:
        cfg, bm = self.cfg, self.blocks
        n_pages = -(-seq_len // self.block_size)
        pages = n_pages - cfg.recent_pages  # full pages before the recent window
        assert st.n_stable is not None
        need = self._pool_need(st.n_stable, pages)
        if pages - need < self.min_saving:
            st.keep_all = True
            return
        table = bm.block_table(rid)[:pages]
        if -1 in table:  # already released (cannot happen without an Offload)
            return
        got = self._reserve(rid, table, need, pages)
        if got is None:  # no room for the pool now: try at the next step
            return
        pool, released = got
        keep = self._keep(st, n_pages, pages)
        st.off = Offload(
            self.cache.k, self.cache.v, table, keep, pool, st.n_stable, cfg.top_k_pages,
            self.host_pool, self.slot_offsets is not None,
        )  # fmt: skip
        self.released_blocks += released or bm.release_blocks(rid, pages)
        self.offloads += 1

    def _keep(self, st: _RequestState, n_pages: int, pages: int) -> torch.Tensor:
        """Which of the first `pages` pages each (layer, head) keeps on the device at a
        hand-off: stable heads their top-K, sink and recent pages; unstable heads all."""
        cfg, n_layers = self.cfg, self.num_layers
        keep = policy.keep_mask(
            st.top, st.stable, torch.ones(n_layers, dtype=torch.bool, device=self.device),
            torch.full((n_layers,), n_pages, device=self.device), cfg.recent_pages, n_pages,
            cfg.sink_pages,
        )[..., :pages]  # fmt: skip
        if st.kept is not None:  # pages held until their next re-ranking (hold_unranked)
            keep = keep | st.kept[..., :pages]
        return keep

    @property
    def _held(self) -> int:
        """Pages a stable head may hold beyond its top-K and sink pages (`hold_unranked`):
        those that left the recent window since its last re-ranking."""
        cfg = self.cfg
        if cfg.rerank != "deferred" or not cfg.hold_unranked:
            return 0
        return -(-cfg.rerank_interval // self.block_size)

    def _reserve(self, rid: str, table: list[int], need: int, upto: int):
        """(`need` pool blocks, blocks released so far) for a hand-off of the request's
        pages before `upto` (`table`: their blocks not yet released), or None when there is
        no room. With too few free blocks, the request's own blocks (released by the hand-off
        anyway) make the room if they are enough: released first, the pool may take them
        (`Offload` reads each chunk of layers' pages, a copy, before it writes those layers'
        pool slots, in stream order). Before, a full cache never had room: the request kept
        its blocks and was preempted over and over."""
        bm = self.blocks
        if not need:
            return [], 0
        pool = bm.reserve_blocks(rid, need)
        if pool is not None:
            return pool, 0
        own = sum(bm.allocator.ref_count(b) == 1 for b in set(table))
        if bm.allocator.num_available + own < need:
            return None
        released = bm.release_blocks(rid, upto)
        pool = bm.reserve_blocks(rid, need)
        assert pool is not None, (need, bm.allocator.num_available)
        self.released_first += 1
        return pool, released

    def release(self, request_id: str) -> None:
        """Forget a request (finished, aborted or preempted): its host copy goes; its pool
        blocks are the block manager's to free."""
        st = self.requests.pop(request_id, None)
        if st is not None and st.off is not None:
            st.off.free()

    def host_bytes(self) -> int:
        return sum(st.off.host_bytes() for st in self.requests.values() if st.off is not None)

    def stats(self) -> dict[str, float]:
        """kept_fraction: kept / all (request, layer, head) pages read at FlexiCache steps
        (the GPU-resident KV share a real offload would have; modeled here);
        stable_fraction: stable heads / heads at those steps."""
        total = max(int(self._total), 1)
        offs = [st.off for st in self.requests.values() if st.off is not None]
        return {
            "kept_fraction": int(self._kept) / total,
            "stable_fraction": int(self._stable) / max(int(self._heads), 1),
            "offloads": self.offloads,
            "extensions": self.extensions,
            "extensions_after": self.extensions_after,
            "released_blocks": self.released_blocks,
            "released_first": self.released_first,
            "pool_blocks": sum(len(o.pool) for o in offs),
            # resident pages over the pools' slots in all layers: what sizing every layer's
            # pool by the worst layer leaves unused (a block has Hkv slots in each layer)
            "pool_slot_use": sum(int((o.lslot >= 0).sum()) for o in offs)
            / max(sum(o.capacity * o.lslot.shape[0] for o in offs), 1),
            "host_bytes": self.host_bytes(),
            "fetched_pages": self.fetched_pages,
            "evicted_pages": self.evicted_pages,
            "steps": self.clock,
            "plain_steps": self.plain_steps,
            "rerank_reads_kept": self.rerank_reads_kept,
            "host_write_fallbacks": HOST_WRITES["fallbacks"],  # process-wide
            **(self.host_pool.stats() if self.host_pool is not None else {}),
        }


def flexi_engine(config, num_kv_layers: int, num_kv_heads: int, device) -> FlexiEngine | None:
    """The runner's FlexiCache hook for an EngineConfig, None when `flexicache` is off."""
    cfg = config.flexicache_config
    if cfg is None:
        return None
    return FlexiEngine(cfg, num_kv_layers, num_kv_heads, config.block_size, torch.device(device))
