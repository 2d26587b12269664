"""The two lower tiers of a tiered library: its files on disk, read by chunk rows, and a
pinned CPU chunk cache in front of them.

Disk: a layer file is safetensors (an 8-byte header length, a JSON header naming each
tensor's dtype, shape and byte range, then the data). `DiskChunks` parses the headers once
and reads a chunk's K and V rows (and an FP8 library's k_scale/v_scale rows, [S, Hkv]
fp32 beside them) with positioned reads (`os.preadv`) straight into the destination
buffer: only those rows' bytes are read, never the whole file.

CPU: `CpuChunks` holds chunk rows in pinned slots ([slots, slot_rows, Hkv, D] for K and
V, [slots, slot_rows, Hkv] for FP8 scales), keyed (layer, chunk), evicted by the same
policies as the GPU cache. An asynchronous copy out of a slot records an event; the slot
is not refilled before that event passes.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from moska.library.chunk_cache import SlotCache
from moska.library.errors import CorruptLibraryError
from moska.library.format import Manifest, layer_file, validate_file_name

_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn,
    "U8": torch.uint8,
}


class DiskChunks:
    """Positioned reads of chunk rows out of a library's layer files."""

    def __init__(self, directory: Path, manifest: Manifest, keys: tuple[str, ...] = ("k", "v")):
        self.directory = Path(directory)
        self.manifest = manifest
        self.keys = keys
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}
        # layer -> key -> (dtype, shape, first byte of the data in the file)
        self._layout: list[dict[str, tuple[torch.dtype, tuple[int, ...], int]]] = [
            self._parse(i) for i in range(manifest.num_kv_layers)
        ]

    def _parse(self, layer: int) -> dict:
        fname = validate_file_name(layer_file(layer))
        name = self.manifest.name
        try:
            with open(self.directory / fname, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise CorruptLibraryError(name, fname, f"unreadable header ({type(e).__name__})")
        out = {}
        for key in self.keys:
            entry = header.get(key)
            if entry is None or entry.get("dtype") not in _ST_DTYPES:
                raise CorruptLibraryError(name, fname, f"{key}: missing or of an unknown dtype")
            lo, _ = entry["data_offsets"]
            out[key] = (_ST_DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + n + lo)
        return out

    @property
    def num_layers(self) -> int:
        return self.manifest.num_kv_layers

    def layout(self, layer: int, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _ = self._layout[layer][key]
        return dtype, shape

    def _fd(self, layer: int) -> int:
        fd = self._fds.get(layer)
        if fd is None:
            fd = os.open(self.directory / validate_file_name(layer_file(layer)), os.O_RDONLY)
            self._fds[layer] = fd
        return fd

    def read_rows(self, layer: int, key: str, start: int, end: int, out: torch.Tensor) -> None:
        """Rows ``[start, end)`` of tensor ``key`` of layer ``layer`` into ``out`` (a
        contiguous CPU tensor [end - start, ...] of the file's dtype)."""
        dtype, shape, base = self._layout[layer][key]
        row_bytes = out[0].numel() * out.element_size() if out.shape[0] else 0
        assert out.dtype == dtype and out.is_contiguous() and out.shape[0] == end - start
        assert tuple(out.shape[1:]) == shape[1:] and 0 <= start <= end <= shape[0]
        nbytes = (end - start) * row_bytes
        if nbytes == 0:
            return
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy arrays are buffers; its stubs do not say so
        with self._lock:
            got = os.preadv(self._fd(layer), [buf], base + start * row_bytes)
            self.bytes_read += got
        if got != nbytes:
            fname = layer_file(layer)
            raise CorruptLibraryError(self.manifest.name, fname, "truncated (short read)")

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class MemoryChunks:
    """A chunk source already in (pinned) CPU memory: per-layer pools [S, Hkv, D] whose
    rows are handed out as views, with no CPU cache in front (benchmarks, and libraries
    built in this process)."""

    def __init__(
        self,
        k_pools: list[torch.Tensor],
        v_pools: list[torch.Tensor],
        kv_scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None,  # FP8: [S, Hkv] fp32
    ) -> None:
        self.pools = {"k": k_pools, "v": v_pools}
        if kv_scales is not None:
            self.pools["k_scale"] = [ks for ks, _ in kv_scales]
            self.pools["v_scale"] = [vs for _, vs in kv_scales]
        self.keys = tuple(self.pools)
        self.bytes_read = 0

    @property
    def num_layers(self) -> int:
        return len(self.pools["k"])

    def layout(self, layer: int, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self.pools[key][layer]
        return t.dtype, tuple(t.shape)

    def views(self, layer: int, start: int, end: int) -> dict[str, torch.Tensor]:
        return {key: pools[layer][start:end] for key, pools in self.pools.items()}


class ChunkReads(NamedTuple):
    """What `CpuChunks.get` returns."""

    views: dict[tuple[int, int], dict[str, torch.Tensor]]  # key -> {"k": [len, Hkv, D], "v"}
    misses: list[tuple[int, int]]  # the keys read from disk (or into fresh memory)


class CpuChunks:
    """A pinned CPU chunk cache over `DiskChunks`, keyed (layer, chunk)."""

    def __init__(
        self,
        disk: DiskChunks | MemoryChunks,
        offsets: list[int],  # [C + 1] chunk row offsets
        num_slots: int,
        eviction: str,
        pin: bool,
    ) -> None:
        self.disk = disk
        self.offsets = offsets
        self.slot_rows = max(b - a for a, b in itertools.pairwise(offsets))
        if isinstance(disk, MemoryChunks):  # already in memory: no slots in front of it
            num_slots = 1
        self.pools = {}  # key -> [slots, slot_rows, ...]: K and V, and an FP8 library's scales
        for key in disk.keys:
            dtype, shape = disk.layout(0, key)
            size = (num_slots, self.slot_rows, *shape[1:])
            self.pools[key] = torch.empty(size, dtype=dtype, pin_memory=pin)
        self.cache: SlotCache[tuple[int, int]] = SlotCache(num_slots, eviction)
        self._busy: dict[int, torch.cuda.Event] = {}  # slot -> copy out of it in flight

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.pools.values())

    def get(self, keys: list[tuple[int, int]]) -> ChunkReads:
        """CPU views of (layer, chunk) keys, read from disk on a miss, and the keys that
        were misses. The views stay valid until the next `get` (callers copy them out
        first, then `mark_busy`)."""
        if isinstance(self.disk, MemoryChunks):
            o = self.offsets
            return ChunkReads({(l, c): self.disk.views(l, o[c], o[c + 1]) for l, c in keys}, [])
        adm = self.cache.admit(keys)
        out = {}
        for key, slot in adm.hits:
            out[key] = self._views(key, slot)
        for key, slot in adm.loads:
            busy = self._busy.pop(slot, None)
            if busy is not None:
                busy.synchronize()  # an earlier copy still reads this slot
            views = self._views(key, slot)
            layer, chunk = key
            start, end = self.offsets[chunk], self.offsets[chunk + 1]
            for name, t in views.items():
                self.disk.read_rows(layer, name, start, end, t)
            out[key] = views
        for key in adm.overflow:  # more keys than slots: read into fresh memory
            layer, chunk = key
            start, end = self.offsets[chunk], self.offsets[chunk + 1]
            views = {}
            for name, pool in self.pools.items():
                views[name] = torch.empty((end - start, *pool.shape[2:]), dtype=pool.dtype)
                self.disk.read_rows(layer, name, start, end, views[name])
            out[key] = views
        return ChunkReads(out, [k for k, _ in adm.loads] + adm.overflow)

    def _views(self, key: tuple[int, int], slot: int) -> dict[str, torch.Tensor]:
        chunk = key[1]
        n = self.offsets[chunk + 1] - self.offsets[chunk]
        return {name: pool[slot, :n] for name, pool in self.pools.items()}

    def mark_busy(self, keys: list[tuple[int, int]], event: torch.cuda.Event) -> None:
        """Asynchronous copies out of these keys' slots complete at `event`."""
        for key in keys:
            slot = self.cache.slot_of.get(key)
            if slot is not None:
                self._busy[slot] = event
