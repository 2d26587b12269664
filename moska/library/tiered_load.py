"""Loading a library into tiers: the routing index onto the device, the chunk KV left on
disk behind a pinned CPU cache and a GPU chunk cache sized from the budgets."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import NamedTuple

import torch

from moska.library.chunk_store import DiskChunks
from moska.library.errors import CorruptLibraryError
from moska.library.format import Manifest, layer_file, validate_file_name
from moska.library.tiers import _MIN_CPU_SLOTS, ChunkTiers, TierConfig

logger = logging.getLogger(__name__)


class SlotPlan(NamedTuple):
    """The slots a tiered library gets from the budgets."""

    gpu_slots: int  # per layer; >= the chunk count: the library fits (load it all-resident)
    cpu_slots: int  # over all layers


def plan_slots(manifest: Manifest, config: TierConfig, device: torch.device) -> SlotPlan:
    """The GPU slots per layer and CPU slots for the budgets."""
    m = manifest.model
    offs = manifest.chunk_offsets
    slot_rows = max(b - a for a, b in itertools.pairwise(offs))
    if getattr(manifest, "kv_dtype", "auto") == "fp8":  # e4m3 K, V and fp32 scales per row
        row_bytes = m.num_kv_heads * (2 * m.head_dim + 2 * 4)
    else:
        el = torch.empty((), dtype=getattr(torch, m.dtype)).element_size()
        row_bytes = 2 * m.num_kv_heads * m.head_dim * el
    slot_bytes = slot_rows * row_bytes  # K and V (and FP8 scales) of one chunk
    layers = manifest.num_kv_layers
    gpu_slots = config.gpu_bytes(device) // (slot_bytes * layers)
    if gpu_slots < 1:
        raise ValueError(
            f"library_gpu_budget {config.gpu_budget} holds no chunk of library "
            f"{manifest.name!r} ({slot_bytes * layers} bytes per chunk over {layers} layers); "
            "raise it"
        )
    total = manifest.num_chunks * layers
    cpu_bytes = config.cpu_bytes()
    if cpu_bytes is None:
        cpu_slots = total
    else:
        cpu_slots = min(total, max(_MIN_CPU_SLOTS, cpu_bytes // slot_bytes))
    return SlotPlan(min(gpu_slots, manifest.num_chunks), cpu_slots)


def load_routing(directory: Path, manifest: Manifest, layer: int, device, pool_dtype) -> dict:
    """The routing index fields of one layer file (`index.*`), read alone onto `device`."""
    from safetensors import safe_open

    from moska.kernels.router import RoutingIndex, to_lowrank_dtype

    fname = validate_file_name(layer_file(layer))
    fields = {}
    try:
        with safe_open(str(directory / fname), framework="pt", device=str(device)) as f:
            names = set(f.keys())
            for name in RoutingIndex._fields:
                if name == "chunk_offsets":
                    continue
                if "index." + name not in names:
                    raise CorruptLibraryError(
                        manifest.name, fname, f"routing field {name!r} missing"
                    )
                fields[name] = f.get_tensor("index." + name)
    except CorruptLibraryError:
        raise
    except Exception as e:  # safetensors' own error types; keep paths out
        raise CorruptLibraryError(manifest.name, fname, f"unreadable ({type(e).__name__})") from e
    fields["lowrank_keys"] = to_lowrank_dtype(fields["lowrank_keys"], pool_dtype)
    return fields


def load_tiered(
    directory: Path,
    manifest: Manifest,
    offsets: torch.Tensor,  # [C + 1] int32 on device
    tokens: torch.Tensor,
    device: torch.device,
    config: TierConfig,
    num_slots: int,
    cpu_slots: int,
    reserve=None,
):
    """A LoadedLibrary whose chunk KV lives in tiers (`library.tiers`). ``reserve`` (the
    manager's, as for load_library): rows of the engine's one slot space for the GPU slots
    of K and V (not FP8), so a composed request reads them in the resident libraries'
    launch; None, or no range free: slot pools of their own."""
    from moska.kernels.router import RoutingIndex
    from moska.library.fp8_rotated import q_rotation_for
    from moska.library.loaded import LoadedLibrary

    m = manifest.model
    fp8 = getattr(manifest, "kv_dtype", "auto") == "fp8"
    dtype = getattr(torch, m.dtype)
    s, hkv = manifest.num_tokens, m.num_kv_heads
    want: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        "k": (torch.float8_e4m3fn if fp8 else dtype, (s, hkv, m.head_dim))
    }
    want["v"] = want["k"]
    if fp8:  # per-(token, KV head) scales, read with their chunk's rows (library/fp8.py)
        want["k_scale"] = want["v_scale"] = (torch.float32, (s, hkv))
    disk = DiskChunks(directory, manifest, keys=tuple(want))
    for i in range(manifest.num_kv_layers):
        for key, (kdtype, shape) in want.items():
            if disk.layout(i, key) != (kdtype, shape):
                raise CorruptLibraryError(
                    manifest.name, layer_file(i), f"{key}: expected {shape} {kdtype}"
                )
    routing = [
        RoutingIndex(chunk_offsets=offsets, **load_routing(directory, manifest, i, device, dtype))
        for i in range(manifest.num_kv_layers)
    ]
    rng = None
    if reserve is not None and not fp8:
        from moska.library.arena import ArenaLayout

        layout = ArenaLayout(manifest.num_kv_layers, hkv, m.head_dim, dtype, device)
        offs = manifest.chunk_offsets
        rng = reserve(manifest, layout, num_slots * max(b - a for a, b in itertools.pairwise(offs)))
    try:
        tiers = ChunkTiers(
            manifest.chunk_offsets, disk, config, device, num_slots, cpu_slots, arena_rows=rng
        )
    except BaseException:
        if rng is not None:
            rng.release()
        raise
    logger.info(
        "library %s tiered: %d of %d chunks per layer on %s (%.2f GiB), %d CPU slots "
        "(%.2f GiB), eviction %s, misses %s, prefetch %s",
        manifest.name, num_slots, manifest.num_chunks, device, tiers.nbytes / 2**30,
        cpu_slots, tiers.cpu.nbytes / 2**30, config.eviction, config.miss_policy,
        config.prefetch,
    )  # fmt: skip
    sp = tiers.slot_pools
    scales = list(zip(sp["k_scale"], sp["v_scale"])) if fp8 else None
    tiers.q_rotation = q_rotation_for(manifest, device)  # rotated FP8: q R at every launch
    library = LoadedLibrary(
        manifest, offsets, tiers.k_pools, tiers.v_pools, routing, tokens, tiers=tiers,
        kv_scale_pools=scales,  # the slot scale pools: rows addressed like the slot pools'
        q_rotation=tiers.q_rotation,
    )  # fmt: skip
    if rng is not None:  # the slot rows go back to the arena when the library is collected
        library.arena_range = rng
        rng.attach(library)
    return library
