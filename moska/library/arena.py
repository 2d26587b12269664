"""One slot space for the resident libraries of one model: per KV layer one K and one V pool
tensor that every resident library's chunk rows live in, and a row allocator over it.

Why: the grouped kernel reads one pool tensor per launch and finds each chunk through a slot
table (``ChunkTable`` starts/ends). When the chunks of every library sit in the same tensor,
a request that composes several libraries maps each global chunk id to its rows there, and
one launch serves chunks of all of them (``attention/composed.py``). A pool per library, or
an arena that grows by new segments, needs a launch per allocation.

The arena is allocated once, when the manager places its first library, with a fixed
capacity (the library cache's share for KV: ``LibraryManager``); it never grows or moves, so
a library's pools (views of its rows) and any CUDA graph captured over them stay valid
while the library lives. A library takes one contiguous range of rows, first fit, so its
``k_pools`` are plain views and everything that reads them with ``chunk_offsets`` works
unchanged. The range returns to the free list when the library object is collected
(``weakref.finalize``), so a library in use keeps its rows exactly as a separate allocation
did: a request holding it (acquired, or a composition's part) keeps it alive; an unloaded or
deleted library frees its rows once nothing reads it. On CUDA a range that was used before
is written after a device synchronize (kernels queued on its old rows are done). CUDA pools
start zeroed: a TMA block that runs past a chunk's end reads finite rows (weight 0).

A tiered library (library/tiers.py: its budget smaller than its KV) takes a range too: its
GPU slots of K and V (``num_slots * slot_rows`` rows), which its per-layer slot table
addresses from the range's start; a composition reads them in the resident libraries'
launch (attention/composed_tiers.py). FP8 libraries (e4m3 rows and fp32 scales per row)
keep pools of their own: one launch reads one pool dtype, and a per-part dtype in one
launch would be a second kernel specialization over the same rows.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ArenaLayout:
    """What every library in one arena shares: KV layers, KV heads, head dim, pool dtype,
    device (libraries of one model, resident or tiered; not FP8: pools of their own)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of K and V over every layer."""
        el = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * el


class ArenaFullError(RuntimeError):
    """No free range of the rows asked for (the arena is full or fragmented)."""


@dataclass(frozen=True, eq=False)
class ArenaRange:
    """Rows ``[start, start + rows)`` of an arena, held by one library."""

    arena: KVArena
    start: int
    rows: int

    def k(self, layer: int) -> torch.Tensor:
        with torch.inference_mode(False):  # a normal view, whatever mode the caller is in
            return self.arena.k_pools[layer][self.start : self.start + self.rows]

    def v(self, layer: int) -> torch.Tensor:
        with torch.inference_mode(False):
            return self.arena.v_pools[layer][self.start : self.start + self.rows]

    def attach(self, owner: object) -> None:
        """Free the rows when ``owner`` (the library whose pools view them) is collected."""
        weakref.finalize(owner, self.arena._release, self.start, self.rows)

    def holds(self, library) -> bool:
        """Whether ``library``'s pools are still the views of these rows (a caller may have
        replaced them: then the library is read from its own pools)."""
        for layer, (k, v) in enumerate(zip(library.k_pools, library.v_pools)):
            if k.data_ptr() != self.k(layer).data_ptr() or v.data_ptr() != self.v(layer).data_ptr():
                return False
        return len(library.k_pools) == self.arena.layout.num_layers

    def release(self) -> None:
        """Free the rows now (a load that failed before any library held them)."""
        self.arena._release(self.start, self.rows)


class KVArena:
    """Per layer a [capacity, Hkv, D] K and V pool, and a first-fit allocator of row ranges
    (thread-safe: ranges are freed from whatever thread drops a library's last reference)."""

    def __init__(self, layout: ArenaLayout, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"an arena needs at least one row, got {capacity}")
        self.layout = layout
        self.capacity = capacity
        shape = (capacity, layout.num_kv_heads, layout.head_dim)
        dt, dev = layout.dtype, layout.device
        # zeroed on CUDA (TMA blocks read past a chunk's end); on CPU every read is masked to
        # the chunk's rows and untouched pages of an empty tensor take no memory
        # (normal tensors even when the first library comes in inference mode: later loads
        # write into them outside it)
        make = torch.zeros if dev.type == "cuda" else torch.empty
        with torch.inference_mode(False):
            self.k_pools = [make(shape, dtype=dt, device=dev) for _ in range(layout.num_layers)]
            self.v_pools = [make(shape, dtype=dt, device=dev) for _ in range(layout.num_layers)]
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (start, rows), sorted, disjoint
        self._high = 0  # rows below it were handed out before (reuse synchronizes on CUDA)
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self.capacity * self.layout.row_bytes

    @property
    def free_rows(self) -> int:
        with self._lock:
            return sum(n for _, n in self._free)

    @property
    def largest_free(self) -> int:
        with self._lock:
            return max((n for _, n in self._free), default=0)

    def allocate(self, rows: int) -> ArenaRange:
        """A free range of ``rows`` rows (first fit); ArenaFullError when none is."""
        if rows < 1:
            raise ValueError(f"allocate at least one row, got {rows}")
        with self._lock:
            for i, (start, n) in enumerate(self._free):
                if n >= rows:
                    if n == rows:
                        del self._free[i]
                    else:
                        self._free[i] = (start + rows, n - rows)
                    reused = start < self._high
                    self._high = max(self._high, start + rows)
                    break
            else:
                raise ArenaFullError(
                    f"no free range of {rows} rows in the library arena "
                    f"({sum(n for _, n in self._free)} of {self.capacity} rows free)"
                )
        if reused and self.layout.device.type == "cuda":
            torch.cuda.synchronize(self.layout.device)  # readers of the old rows are done
        return ArenaRange(self, start, rows)

    def _release(self, start: int, rows: int) -> None:
        with self._lock:
            free = [*self._free, (start, rows)]
            free.sort()
            merged: list[tuple[int, int]] = []
            for s, n in free:
                if merged and merged[-1][0] + merged[-1][1] == s:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    assert not merged or merged[-1][0] + merged[-1][1] < s, "double free"
                    merged.append((s, n))
            self._free = merged

    def fits(self, layout: ArenaLayout) -> bool:
        return layout == self.layout

    def place(self, library) -> bool:
        """Move a library built in memory (separate pools) into the arena: its rows copied
        into a range, its ``k_pools``/``v_pools`` lists re-pointed at the views. False (left
        as it is) when it is not of this arena's layout or no range is free."""
        if library.arena_range is not None or library.tiers is not None:
            return False
        if library.kv_scale_pools is not None or library_layout(library) != self.layout:
            return False
        try:
            rng = self.allocate(library.num_tokens)
        except ArenaFullError:
            return False
        with torch.inference_mode(False), torch.no_grad():
            for layer in range(self.layout.num_layers):
                rng.k(layer).copy_(library.k_pools[layer])
                rng.v(layer).copy_(library.v_pools[layer])
                library.k_pools[layer] = rng.k(layer)
                library.v_pools[layer] = rng.v(layer)
        library.arena_range = rng
        rng.attach(library)
        return True


def library_layout(library) -> ArenaLayout:
    """The arena layout a loaded library's pools have."""
    k = library.k_pools[0]
    return ArenaLayout(len(library.k_pools), k.shape[1], k.shape[2], k.dtype, k.device)
