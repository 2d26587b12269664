"""How large the library arena is, and what a library load costs beside it.

The arena (library/arena.py) is allocated whole, so the library cache (engine/memory.py
``MemoryPlan.library_pool``) counts it whole; a library whose KV goes into the arena costs
only its routing index beside it. "auto" gives the arena, when the manager places its first
library, the cache's share for KV of what is left: the rest in that library's ratio of KV
to KV plus routing index (libraries of one model are built alike), at most CPU_ARENA_BYTES
on CPU. With tiers a library's KV on the device is its GPU slots (``device_rows``: the
slots of a tiered library are arena rows too, so a composition reads them in the resident
libraries' launch). Without a memory plan (a manager of its own, the CLI) "auto" makes no
arena.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from moska.engine.memory import library_device_bytes
from moska.library.arena import ArenaLayout
from moska.library.format import Manifest, read_manifest

CPU_ARENA_BYTES = 256 << 20  # the auto arena's cap on CPU (tests, development)


def arena_rows(manager: Any, manifest: Manifest, layout: ArenaLayout) -> int:
    """Rows of the arena ``manager`` would make now for a first library ``manifest``."""
    size = manager._arena_size
    if size is None:
        return 0
    if isinstance(size, int):
        return size // layout.row_bytes
    plan = getattr(manager.memory, "plan", None)
    if plan is None:
        return 0
    kv = device_rows(manager, manifest) * layout.row_bytes
    share = (plan.library_pool - held_bytes(manager)) * kv // max(1, need_bytes(manager, manifest))
    if layout.device.type != "cuda":
        share = min(share, CPU_ARENA_BYTES)
    return max(0, share) // layout.row_bytes


def device_rows(manager: Any, manifest: Manifest) -> int:
    """Rows of K and V ``manifest``'s library holds on the device once loaded: all of them,
    or a tiered library's GPU slots (library/tiered_load.py ``plan_slots``)."""
    if manager.tiers is None:
        return manifest.num_tokens
    from moska.library.tiered_load import plan_slots

    slots = plan_slots(manifest, manager.tiers, manager.device).gpu_slots
    if slots >= manifest.num_chunks:  # it fits: loaded whole
        return manifest.num_tokens
    return slots * max(b - a for a, b in itertools.pairwise(manifest.chunk_offsets))


def need_bytes(manager: Any, manifest: Manifest) -> int:
    """Device bytes of a library loaded on its own (pools of its own, or its tiers)."""
    tiers = manager.tiers
    need = library_device_bytes(manifest, tiers.gpu_bytes(manager.device) if tiers else None)
    mma = getattr(manager, "fp8_attention", "upcast") != "upcast"  # library/fp8_mma.py
    if mma and manifest.kv_dtype == "fp8" and tiers is None and manager.device.type == "cuda":
        m = manifest.model  # the token-major V copy: a byte per (KV layer, token, head, dim)
        need += manifest.num_kv_layers * m.num_kv_heads * m.head_dim * manifest.num_tokens
    return need


def held_bytes(manager: Any) -> int:
    """Device bytes the libraries hold: the arena whole, and what each loaded library holds
    beside its rows in it."""
    held = 0 if manager.arena is None else manager.arena.nbytes
    for lib in manager._loaded.values():
        held += int(lib.nbytes)
        rng = getattr(lib, "arena_range", None)
        if rng is not None:
            held -= rng.rows * rng.arena.layout.row_bytes
    return held


def manifest_layout(manager: Any, manifest: Manifest) -> ArenaLayout:
    """The layout ``manager`` would load ``manifest``'s pools in."""
    m = manifest.model
    heads = manager.load_options.get("kv_heads")
    hkv = m.num_kv_heads if heads is None else heads[1] - heads[0]
    return ArenaLayout(
        manifest.num_kv_layers, hkv, m.head_dim, getattr(torch, m.dtype), manager.device
    )


def check_memory(manager: Any, name: str) -> None:
    """Before ``manager`` loads ``name``: LibraryMemoryError when it would not fit the library
    cache (``manager.memory``; nothing without one). Its KV costs nothing beside the arena
    when the arena has a free range for it."""
    if manager.memory is None:
        return
    manifest = read_manifest(manager.root / name)
    need = need_bytes(manager, manifest)
    arena = manager.arena
    if arena is not None and manifest.kv_dtype != "fp8":
        rows = device_rows(manager, manifest)
        if arena.fits(manifest_layout(manager, manifest)) and arena.largest_free >= rows:
            need -= rows * arena.layout.row_bytes
    manager.memory.check(name, need, held_bytes(manager))
