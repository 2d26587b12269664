"""A library larger than the GPU: its chunk KV in three tiers (GPU slots, pinned CPU, disk).

The routing index stays on the device. Each KV layer has a GPU chunk cache of `num_slots`
slots of `slot_rows` rows ([num_slots * slot_rows, Hkv, D] pools) and a slot table
(`ChunkTable`: starts [C], ends [C]; an absent chunk has start == end), so chunk ids in the
router's selections stay logical while the grouped kernel reads each chunk from its slot.
With the engine's arena (library/arena.py) the K and V slot pools of every layer are a range
of its rows, so a composed request reads a tiered part's slots in the same launch as the
resident parts' rows (`stage` / `admit_pass` / `finish`: attention/composed_tiers.py).

Per layer and step (`ChunkTiers.attend`): the routed chunks (one host read of a [C] count)
-> hits and misses of the layer's cache -> misses read from the CPU tier (from
disk on a CPU miss) and copied into their slots (on CUDA on a copy stream, the kernel
waits on an event; on CPU plain copies) -> the grouped kernel through the slot table.
Miss policies: "wait" (the step waits for its chunks: exact) or "skip" (a chunk that is not
resident when routed is dropped from this step's selections and fetched for later steps;
the lost share of the attention shows in the request's routing coverage).
When a step needs more chunks in one layer than the layer has slots (top_k = all under a
small budget) it runs in passes of at most `num_slots` chunks; results are exact.
Prefetch ("next_layer"): layer l's routed chunks are fetched for layer l + 1 while layer
l's kernel runs (chosen by `bench/tier_prefetch_study.py`: see docs/architecture.md).
FP8 libraries: the slot pools hold e4m3 rows and per-slot-row fp32 scale pools
([num_slots * slot_rows, Hkv], k and v) sit beside them, filled with the rows on the same
copy stream from the same CPU and disk tiers; the kernel reads them addressed like the rows.
Under `--fp8-attention mma` a token-major copy of the V slots is filled beside them (on the
device, after the rows) and read by the FP8 tensor-core program (library/fp8_mma.py).
Sync-free reads: a layer whose cache holds every chunk, a skipping step under
`sync="step"` and `attend_resident` read the host nothing: their counts settle once per step
(library/tier_ledger.py, tier_sync_free.py); slot tables change by pinned non-blocking uploads of a host mirror.
Tiered libraries run eagerly (no decode CUDA graphs: a graph captures fixed pointers and
no host sync).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from moska.kernels.selections import Selections
from moska.kernels.shared_inputs import ChunkTable
from moska.library.chunk_cache import Admission, SlotCache
from moska.library.chunk_store import CpuChunks, DiskChunks, MemoryChunks
from moska.library.fp8_mma import mma_kwargs
from moska.library.tier_config import (  # re-exported: the tiers' configuration and counters
    MISS_POLICIES,
    PREFETCH_POLICIES,
    TierConfig,
    TierStats,
    parse_budget,
)
from moska.library.tier_ledger import DemandLedger
from moska.library.tier_select import TierStep, _empty, _subset, _swap_plan, chunk_rows
from moska.library.tier_sync_free import SyncFreeReads

__all__ = ["MISS_POLICIES", "PREFETCH_POLICIES", "ChunkTiers", "TierConfig", "TierStats"]
__all__ += ["TierStep", "chunk_rows", "parse_budget"]

_MIN_CPU_SLOTS = 8  # a staging ring when the CPU tier has (almost) no budget


class ChunkTiers(SyncFreeReads):
    """The GPU chunk caches of one library (one per KV layer) over its CPU and disk tiers."""

    def __init__(
        self,
        offsets: list[int],  # [C + 1]
        disk: DiskChunks | MemoryChunks,
        config: TierConfig,
        device: torch.device,
        num_slots: int,
        cpu_slots: int,
        arena_rows: Any = None,  # library/arena.py ArenaRange of num_slots * slot_rows rows
    ) -> None:
        self.config = config
        self.device = device
        self.offsets = offsets
        self.num_chunks = len(offsets) - 1
        self.num_layers = disk.num_layers
        self.num_slots = num_slots
        cuda = device.type == "cuda"
        self.cpu = CpuChunks(disk, offsets, cpu_slots, config.eviction, pin=cuda)
        self.slot_rows = self.cpu.slot_rows
        # per source key ("k", "v", and an FP8 library's "k_scale", "v_scale"): one GPU slot
        # pool per layer, [slots * slot_rows, Hkv, D] (scales [slots * slot_rows, Hkv])
        self.slot_pools: dict[str, list[torch.Tensor]] = {}
        # (or, given `arena_rows`, K and V slots are rows of the engine's one slot space, so a
        # composed request reads them in the launch of the resident libraries: composed.py)
        self.arena_rows = arena_rows
        for key in disk.keys:
            if arena_rows is not None and key in ("k", "v"):
                assert arena_rows.rows == num_slots * self.slot_rows
                pick = arena_rows.k if key == "k" else arena_rows.v
                self.slot_pools[key] = [pick(i) for i in self._layers]
                continue
            dtype, shape = disk.layout(0, key)
            rows = (num_slots * self.slot_rows, *shape[1:])
            init = torch.ones if key.endswith("_scale") else torch.zeros
            self.slot_pools[key] = [init(rows, dtype=dtype, device=device) for _ in self._layers]
        self.k_pools, self.v_pools = self.slot_pools["k"], self.slot_pools["v"]
        self.fp8 = "k_scale" in self.slot_pools
        # library/fp8_mma.py TokenMajorV under --fp8-attention mma: the V slot pools copied
        # token-major, a chunk's columns written by _fill after its rows; None: upcast
        self.fp8_mma: Any = None
        # a rotated FP8 library's q rotation [D, D] (library/fp8_rotated.py): every launch
        # over the slots rotates q by it; set by tiered_load; None: not rotated
        self.q_rotation: torch.Tensor | None = None
        self.row_bytes = sum(  # bytes of one row of every key together
            p[0][0].numel() * p[0].element_size() for p in self.slot_pools.values()
        )
        self.caches: list[SlotCache[int]] = [
            SlotCache(num_slots, config.eviction) for _ in self._layers
        ]
        # the slot tables ([L, 2, C] int32 on the device: starts, ends) and their host mirror,
        # edited by the host and uploaded whole per change from pinned memory (non-blocking:
        # a `torch.tensor(..., device=)` of the changed entries would wait for the queue)
        self._table_host = torch.zeros(self.num_layers, 2, self.num_chunks, dtype=torch.int32)
        self._table_dev = self._table_host.to(device, copy=True)
        self.tables = [ChunkTable(t[0], t[1]) for t in self._table_dev]
        self.stats = TierStats()
        self.ledger = DemandLedger(self.num_layers, self.num_chunks, device)
        self._snaps: list[tuple[int, frozenset[int]]] = [(-1, frozenset()) for _ in self._layers]
        self._copy = torch.cuda.Stream(device) if cuda else None
        self._read_done: list[torch.cuda.Event | None] = [None] * self.num_layers
        self._copy_done: list[torch.cuda.Event | None] = [None] * self.num_layers
        self._last: list[list[int]] = [[] for _ in self._layers]  # chunks of the last step

    @property
    def _layers(self) -> range:
        return range(self.num_layers)

    @property
    def nbytes(self) -> int:
        """Device bytes of the GPU chunk caches (with an FP8 library's scale pools)."""
        return sum(t.numel() * t.element_size() for p in self.slot_pools.values() for t in p)

    def kv_scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An FP8 library's slot scale pools of `layer` (k, v) [slots * slot_rows, Hkv] fp32,
        addressed like the slot rows; None for other libraries."""
        if not self.fp8:
            return None
        return self.slot_pools["k_scale"][layer], self.slot_pools["v_scale"][layer]

    def resident(self, layer: int) -> set[int]:
        return set(self.caches[layer].slot_of)

    # -- moving chunks -------------------------------------------------------------------

    def _fill(self, layer: int, loads: list[tuple[int, int]]) -> None:
        """Copy chunks into their GPU slots of `layer` and point the slot table at them."""
        if not loads:
            return
        views, cpu_misses = self.cpu.get([(layer, c) for c, _ in loads])
        s = self.stats
        s.misses["cpu"] += len(cpu_misses)
        s.hits["cpu"] += len(loads) - len(cpu_misses)
        row_bytes = self.row_bytes
        s.bytes_in["cpu"] += sum(
            (self.offsets[c + 1] - self.offsets[c]) * row_bytes for _, c in cpu_misses
        )
        stream = self._copy
        read_done = self._read_done[layer]
        if stream is not None and read_done is not None:
            stream.wait_event(read_done)  # the slots' last readers are done
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for c, slot in loads:
                n = self.offsets[c + 1] - self.offsets[c]
                row = slot * self.slot_rows
                v = views[(layer, c)]
                for key, pools in self.slot_pools.items():  # K, V (and FP8 scales)
                    pools[layer][row : row + n].copy_(v[key], non_blocking=True)
                if self.fp8_mma is not None:  # the token-major V copy kept in step
                    vt = self.fp8_mma.pools[layer][:, :, row : row + n]
                    vt.copy_(self.v_pools[layer][row : row + n].permute(1, 2, 0))
                s.bytes_in["gpu"] += n * row_bytes
        if stream is not None:
            done = torch.cuda.Event()
            done.record(stream)
            self._copy_done[layer] = done
            self.cpu.mark_busy([(layer, c) for c, _ in loads], done)
        host = self._table_host[layer]
        for c, slot in loads:
            host[0, c] = slot * self.slot_rows
            host[1, c] = slot * self.slot_rows + self.offsets[c + 1] - self.offsets[c]

    def _forget(self, layer: int, evicted: list[int]) -> None:
        host = self._table_host[layer]
        for c in evicted:
            host[1, c] = host[0, c]  # start == end: absent

    def _push_table(self, layer: int) -> None:
        """The host mirror of `layer`'s slot table to the device, in stream order (pinned
        and non-blocking on CUDA: no host sync)."""
        src = self._table_host[layer]
        if self.device.type == "cuda":
            src = src.pin_memory()
        self._table_dev[layer].copy_(src, non_blocking=True)

    def _admit(self, layer: int, chunks: list[int], protect=(), count: bool = True) -> Admission:
        """Make `chunks` resident in `layer` (loads issued); what was decided."""
        cache = self.caches[layer]
        adm = cache.admit(chunks, protect, count)
        if count:
            self.stats.hits["gpu"] += len(adm.hits)
            self.stats.misses["gpu"] += len(adm.loads) + len(adm.overflow)
        self._forget(layer, adm.evicted)
        self._fill(layer, adm.loads)
        if adm.evicted or adm.loads:
            self._push_table(layer)
        return adm

    def prefetch(self, layer: int, chunks: list[int], protect=()) -> None:
        """Fetch `chunks` into `layer`'s cache ahead of use (no wait, no hit/miss count)."""
        if not 0 <= layer < self.num_layers:
            return
        cache = self.caches[layer]
        todo = [c for c in chunks if c not in cache][: cache.num_slots]
        if todo:
            self.stats.prefetched += len(self._admit(layer, todo, protect, count=False).loads)

    # -- attention -----------------------------------------------------------------------

    def attend(self, ops, layer: int, q_rows, sel: Selections, sm_scale: float, wait=None):
        """Grouped shared attention of `sel` through `layer`'s GPU cache: (o [N', G, D],
        lse [N', G], sel') where sel' is `sel` less the selections the skip policy dropped
        (sel itself under "wait"). `wait` overrides the miss policy (True: wait).
        Sync-free (`_sync_free`): sel comes back whole, an absent chunk's selections read as
        empty (o 0, lse -inf: no share of the attention), counted once per step."""
        if self.ledger.new_step(layer):
            self._settle()
        if self._sync_free(layer, wait):
            self.ledger.add(layer, sel.chunk, self._resident_snapshot(layer))
            return (*self._run(ops, layer, q_rows, sel, sm_scale, None), sel)
        step = self.stage(layer, self._demand(sel), wait)
        if step.absent:
            before = sel.req.numel()
            sel = _subset(sel, step.passes[0] if step.passes else [], self.num_chunks)
            self.stats.skipped += before - sel.req.numel()
        if not step.passes:
            out = _empty(q_rows, sel, self.k_pools[layer].shape[1])
        elif len(step.passes) == 1:
            out = (*self._run(ops, layer, q_rows, sel, sm_scale, None), sel)
        else:  # more chunks than slots: passes of num_slots chunks, each selection once
            g = q_rows.shape[1] // self.k_pools[layer].shape[1]
            n, d = sel.req.numel(), q_rows.shape[2]
            o = torch.zeros(n, g, d, dtype=q_rows.dtype, device=q_rows.device)
            lse = torch.full((n, g), float("-inf"), device=q_rows.device)
            for i, batch in enumerate(step.passes):
                if i:
                    self.admit_pass(step, i)
                idx, o_p, lse_p = self._run(ops, layer, q_rows, sel, sm_scale, batch)
                o.index_copy_(0, idx, o_p.to(o.dtype))
                lse.index_copy_(0, idx, lse_p)
            out = (o, lse, sel)
        self.finish(step)
        return out

    def resident_mask(self, layer: int) -> torch.Tensor:
        """[C] bool on the device, True where `layer` holds the chunk (no host sync): what
        residency-biased routing masks or favours (library/tier_bias.py)."""
        starts, ends = self.tables[layer]
        return ends > starts

    def attend_resident(self, ops, layer: int, q_rows, sel: Selections, sm_scale: float):
        """(o, lse) of selections the caller knows are resident (routed among
        `resident_mask` chunks): no host sync, no bookkeeping; an absent chunk would read
        as empty (start == end), so only routing restricted to resident chunks may call it.
        Its uses are counted on the device and settled once per step (tier_ledger.py)."""
        if self.ledger.new_step(layer):
            self._settle()
        self.ledger.add(layer, sel.chunk, self._resident_snapshot(layer))
        return self._run(ops, layer, q_rows, sel, sm_scale, None)

    def stage(self, layer: int, demand: dict[int, int], wait: bool | None = None) -> TierStep:
        """Make `layer`'s routed chunks (chunk id -> its selections this step) readable for a
        launch through `tables[layer]` (the launch brackets itself with `before_read` and
        `after_read`, then calls `finish`). "wait": passes of at most `num_slots` chunks,
        hits first, the first admitted now (the others by `admit_pass`, each after the
        launch of the one before). "skip": one pass of the resident chunks; the absent ones
        are dropped from this step (the launch leaves their selections out) and fetched by
        `finish` when this step wanted them more than some resident ones (without that
        swap a protected slot is never evicted and the hot misses never arrive). `wait`
        overrides the miss policy (True: wait)."""
        skip = self.config.miss_policy == "skip" if wait is None else not wait
        cache = self.caches[layer]
        cache.tick()
        needed = sorted(demand, key=lambda c: c not in cache)  # hits first
        self._last[layer] = needed
        if skip:
            present = [c for c in needed if c in cache]
            absent = needed[len(present) :]
            self.stats.hits["gpu"] += len(present)
            self.stats.misses["gpu"] += len(absent)
            cache.admit(present, count=False)  # a use: the policy's clock and counts
            return TierStep(layer, [present] if present else [], absent, demand, True)
        passes = [needed[i : i + self.num_slots] for i in range(0, len(needed), self.num_slots)]
        if passes:
            self._admit(layer, passes[0])
        self._prefetch_next(layer, needed)
        return TierStep(layer, passes, [], demand, False)

    def admit_pass(self, step: TierStep, i: int) -> None:
        """Make pass `i` (> 0) of a staged "wait" step readable (after pass i - 1's launch)."""
        self._admit(step.layer, step.passes[i])

    def finish(self, step: TierStep) -> None:
        """After a skipping step's launch: the swap, and its chunks fetched for the layer
        above (the copy stream waits for the launch's read: `after_read`)."""
        if not step.skip:
            return
        present = step.passes[0] if step.passes else []
        if step.absent:
            plan = _swap_plan(step.absent, present, step.demand, self.num_slots)
            self.prefetch(step.layer, *plan)
        self._prefetch_next(step.layer, present)

    def before_read(self, layer: int) -> None:
        """The launch that reads `layer`'s slots waits for their copies (CUDA)."""
        done = self._copy_done[layer]
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)

    def after_read(self, layer: int) -> None:
        """Copies into `layer`'s slots wait for the launch just queued (CUDA)."""
        if self._copy is not None:  # one event per layer, recorded again at each read
            ev = self._read_done[layer]
            if ev is None:
                ev = self._read_done[layer] = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))

    def _prefetch_next(self, layer: int, chunks: list[int]) -> None:
        """Layer `layer`'s chunks fetched for the layer above, never in place of what that
        layer read at its last step (the previous step's chunks are the better predictor:
        bench/results/tier_prefetch_study.json; the cache keeps those already)."""
        if self.config.prefetch == "next_layer" and layer + 1 < self.num_layers:
            self.prefetch(layer + 1, chunks[: self.num_slots], protect=self._last[layer + 1])

    def _run(self, ops, layer, q_rows, sel, sm_scale, batch):
        """The grouped kernel over `batch`'s selections (all of `sel` when None)."""
        self.before_read(layer)
        if batch is None:
            sub, idx = sel, None
        else:
            idx = chunk_rows(sel, batch, self.num_chunks)
            sub = Selections(sel.req[idx], sel.kv_head[idx], sel.chunk[idx])
        scales = self.kv_scales(layer)
        kw = {} if scales is None else {"kv_scales": scales}
        if self.q_rotation is not None:  # K stored rotated (library/fp8_rotated.py)
            kw["q_rotation"] = self.q_rotation
        if self.fp8_mma is not None and getattr(ops, "name", None) == "triton":
            kw.update(mma_kwargs(self, layer))  # FP8 tensor cores, V token-major (fp8_mma.py)
        o, lse = ops.grouped_shared(
            q_rows, self.k_pools[layer], self.v_pools[layer], self.tables[layer], sub, sm_scale,
            **kw,
        )  # fmt: skip
        self.after_read(layer)
        return (o, lse) if idx is None else (idx, o, lse)
