"""Device memory accounting: what the engine may use and what each part takes.

The budget is ``gpu_memory_utilization`` of the device's total memory (on CPU, of the
machine's RAM), or ``memory_budget`` when set (an absolute size; how CPU runs test it).
Within it, at startup, in this order:

- weights: the model's parameters and buffers, as loaded;
- activations: one step's peak at ``max_num_batched_tokens`` (an estimate from the model's
  dims: hidden states, q/k/v, the MLP's intermediate, fp32 logits of the sampled rows);
- CUDA graphs: the decode graphs' private pool (an estimate: one decode step's activations
  at ``max_num_seqs`` rows; 0 on CPU or with ``enforce_eager``);
- unique KV blocks: ``num_kv_blocks`` when given, else half of what is left (the other
  half is for libraries; with ``library_gpu_budget`` the tier budget is kept for one
  library and the blocks take the rest); on CPU at most 1 GiB by default;
- the library cache: what is left. Every library load is checked against it first
  (``check_library``): a library that would not fit is refused with a typed error (HTTP
  4xx), never an out-of-memory error in the middle of a request.

Running out of any part raises ``MemoryBudgetError`` at startup, whose message names the
part and the flag to change. Plain Python over byte counts; torch only to read the device.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import Any

CPU_KV_DEFAULT_BYTES = 1 << 30  # the unique KV on CPU when nothing is set (as before)
GRAPH_BUCKET_OVERHEAD = 1 << 20  # per captured bucket: static inputs, kernel arguments
_UNITS = {"": 1 << 30, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class MemoryBudgetError(ValueError):
    """A part of the engine does not fit its memory budget. ``part`` names it ("weights",
    "activations", "cuda_graphs", "kv_blocks", "library")."""

    def __init__(self, message: str, part: str) -> None:
        super().__init__(message)
        self.part = part


class LibraryMemoryError(MemoryBudgetError):
    """Loading a library would exceed the memory left for libraries (HTTP 400, no load)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "library")


def parse_size(value: str | float, what: str) -> int:
    """Bytes of "8GiB", "512MiB", "2G", "1.5" (a plain number is GiB) or an int of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(i?[bB])?", text)
    if m is None:
        raise ValueError(f"{what} must be a size such as 8GiB, 512MiB or 1.5 (GiB), got {value!r}")
    unit = m.group(2).lower() or ("b" if m.group(3) else "")
    return int(float(m.group(1)) * _UNITS[unit])


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if abs(nbytes) >= 2**27 else f"{nbytes / 2**20:.1f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each part; ``library_pool`` is what the library cache may hold."""

    device: str
    budget: int
    weights: int
    activations: int
    cuda_graphs: int
    kv_block_bytes: int
    num_kv_blocks: int
    library_pool: int

    def __post_init__(self) -> None:
        assert self.num_kv_blocks >= 1 and self.library_pool >= 0, self

    @property
    def kv_blocks(self) -> int:
        return self.num_kv_blocks * self.kv_block_bytes

    def lines(self, libraries: int = 0) -> list[str]:
        """The startup report: one line per part."""
        return [
            f"memory budget {gib(self.budget)} on {self.device}",
            f"  weights {gib(self.weights)}",
            f"  activations {gib(self.activations)} (estimate)",
            f"  CUDA graphs {gib(self.cuda_graphs)} (estimate)",
            f"  unique KV {gib(self.kv_blocks)} ({self.num_kv_blocks} blocks)",
            f"  library cache {gib(self.library_pool)} ({gib(libraries)} loaded)",
        ]


def activation_bytes(mcfg: Any, tokens: int, rows: int, elem: int) -> int:
    """One forward's peak over ``tokens`` packed tokens with ``rows`` sampled rows: a few
    hidden-sized tensors, q/k/v, the MLP's gate+up and product, fp32 logits and their
    softmax for the sampled rows. Attention runs in tiles (no [T, T] scores)."""
    qkv = (mcfg.num_heads + 2 * mcfg.num_kv_heads) * mcfg.head_dim
    per_token = (4 * mcfg.hidden_size + qkv + 3 * mcfg.intermediate_size) * elem
    return tokens * per_token + rows * mcfg.vocab_size * 4 * 2


def device_total(device: Any) -> int:
    """Total memory of ``device``: the GPU's, or the machine's RAM for CPU."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_memory(
    config: Any,  # EngineConfig
    mcfg: Any,  # ModelConfig
    device: Any,
    weights: int,
    kv_block_bytes: int,
    elem: int,
    use_graphs: bool,
    total: int | None = None,
    library_reserve: int = 0,
    free: int | None = None,
) -> MemoryPlan:
    """Split the budget (see the module docstring); MemoryBudgetError when a part does not
    fit. ``library_reserve``: bytes kept for one library (the tier budget), else half of
    what the unique KV could take is kept for libraries. ``free``: bytes free on the device
    now, weights loaded (another process's memory is not ours to plan)."""
    kind = getattr(device, "type", str(device))
    total = device_total(device) if total is None else total
    set_budget = getattr(config, "memory_budget", None)
    budget = int(total * config.gpu_memory_utilization)
    if set_budget is not None:
        budget = min(budget, parse_size(set_budget, "memory_budget"))
    fix = "raise --gpu-memory-utilization" + (" or --memory-budget" if set_budget else "")
    acts = activation_bytes(mcfg, config.max_num_batched_tokens, config.max_num_seqs, elem)
    graphs = 0
    if use_graphs:
        buckets = max(1, config.max_num_seqs.bit_length() + 1)
        graphs = activation_bytes(mcfg, config.max_num_seqs, config.max_num_seqs, elem)
        graphs += buckets * GRAPH_BUCKET_OVERHEAD
    used = 0
    for part, nbytes, todo in (
        ("weights", weights, "a smaller model or dtype, or more tensor-parallel ranks"),
        ("activations", acts, "a lower --max-num-batched-tokens or --max-num-seqs"),
        ("cuda_graphs", graphs, "--enforce-eager or a lower --max-num-seqs"),
    ):
        used += nbytes
        if used > budget:
            raise MemoryBudgetError(
                f"out of device memory at startup: {part.replace('_', ' ')} need "
                f"{gib(nbytes)}, and with what comes before them {gib(used)} of the "
                f"{gib(budget)} budget on {kind}: {fix}, or use {todo}",
                part,
            )
    left = budget - used
    if free is not None:  # what is still to allocate must also be free now
        left = min(left, free - acts - graphs)
    # sized here: at least one step's tokens (a longer request is the scheduler's business)
    step = min(_max_len(config, mcfg), config.max_num_batched_tokens)
    min_blocks = max(1, -(-step // config.block_size))
    if config.num_kv_blocks is not None:
        blocks = min_blocks = config.num_kv_blocks  # asked for: it only has to fit
    else:
        room = left - library_reserve if library_reserve else left // 2
        if kind != "cuda" and set_budget is None:
            room = min(room, CPU_KV_DEFAULT_BYTES)
        blocks = max(0, room) // kv_block_bytes
        blocks = max(blocks, min(16, left // kv_block_bytes))  # a tiny budget: what fits
    if blocks < min_blocks or blocks * kv_block_bytes > left:
        raise MemoryBudgetError(
            f"out of device memory at startup: {blocks} unique KV blocks "
            f"({gib(blocks * kv_block_bytes)}) do not fit the {gib(left)} left of the "
            f"{gib(budget)} budget after weights, activations and graphs, or hold less than "
            f"one step's tokens ({min_blocks} blocks): {fix}, or set --num-kv-blocks",
            "kv_blocks",
        )
    pool = left - blocks * kv_block_bytes
    if library_reserve and pool < library_reserve:
        raise MemoryBudgetError(
            f"out of device memory at startup: the library GPU budget {gib(library_reserve)} "
            f"does not fit the {gib(pool)} left after the unique KV: lower "
            "--library-gpu-budget or --num-kv-blocks, or " + fix,
            "library",
        )
    return MemoryPlan(kind, budget, weights, acts, graphs, kv_block_bytes, blocks, pool)


def _max_len(config: Any, mcfg: Any) -> int:
    limit = mcfg.max_position_embeddings
    return min(config.max_model_len or limit, limit)


class LibraryMemory:
    """The library cache's share of the plan, checked before every load (thread-safe;
    what is loaded is counted from the manager's libraries, so an unload frees it)."""

    def __init__(self, plan: MemoryPlan) -> None:
        self.plan = plan
        self._lock = threading.Lock()

    def check(self, name: str, needed: int, loaded: int) -> None:
        """Raise LibraryMemoryError when ``needed`` more bytes beside ``loaded`` exceed the
        library cache."""
        with self._lock:
            pool = self.plan.library_pool
            if loaded + needed > pool:
                raise LibraryMemoryError(
                    f"library {name!r} needs {gib(needed)} of device memory but the library "
                    f"cache has {gib(max(0, pool - loaded))} free of {gib(pool)} "
                    f"({gib(loaded)} held by loaded libraries): unload or delete a library, "
                    "serve it from tiers (--library-gpu-budget), or start with fewer "
                    "--num-kv-blocks or a higher --gpu-memory-utilization"
                )


def library_device_bytes(manifest: Any, tier_gpu_bytes: int | None = None) -> int:
    """Device bytes a library takes once loaded, from its manifest: K and V of every KV
    layer (one byte per element plus fp32 scales per (token, KV head) for FP8), the routing
    index (a low-rank fp16 copy of the keys, per-chunk summaries, the basis). A tiered
    library holds at most ``tier_gpu_bytes`` of KV on the device (its index stays there)."""
    m = manifest.model
    layers, heads, d = manifest.num_kv_layers, m.num_kv_heads, m.head_dim
    elem = _elem_bytes(m.dtype)
    kv_elem = 1 if getattr(manifest, "kv_dtype", "auto") == "fp8" else elem
    tokens, chunks, rank = manifest.num_tokens, manifest.num_chunks, manifest.routing_rank
    kv = 2 * layers * tokens * heads * d * kv_elem
    if kv_elem == 1:  # library/fp8.py LIBRARY_GRANULARITY: a scale per (token, KV head)
        kv += 2 * layers * tokens * heads * 4
    if tier_gpu_bytes is not None:
        kv = min(kv, tier_gpu_bytes)
    lowrank = 4 if elem == 4 else 2
    index = layers * (tokens * heads * rank * lowrank + 3 * chunks * heads * d * elem)
    index += layers * (heads * d * rank * elem + (chunks + 1) * 4)
    return kv + index


def _elem_bytes(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}.get(str(dtype), 2)


def check_library(manager: Any, name: str) -> None:
    """Before ``manager`` loads ``name``: refuse (LibraryMemoryError) when it would not fit
    the library cache; nothing without an accountant (``manager.memory``)."""
    memory = getattr(manager, "memory", None)
    if memory is None:
        return
    from moska.library.format import read_manifest

    manifest = read_manifest(manager.root / name)
    tiers = getattr(manager, "tiers", None)
    tier_bytes = tiers.gpu_bytes(manager.device) if tiers is not None else None
    loaded = sum(int(lib.nbytes) for lib in getattr(manager, "_loaded", {}).values())
    memory.check(name, library_device_bytes(manifest, tier_bytes), loaded)


def library_report(engine: Any) -> str | None:
    """The startup line on the library cache once the startup libraries are loaded."""
    plan = getattr(getattr(engine, "runner", None), "memory_plan", None)
    manager = getattr(engine, "libraries", None)
    if plan is None or manager is None:
        return None
    loaded = {n: lib for n, lib in dict(getattr(manager, "_loaded", {})).items()}
    held = sum(int(lib.nbytes) for lib in loaded.values())
    return (
        f"library cache: {gib(held)} of {gib(plan.library_pool)} held by {len(loaded)} "
        f"loaded librar{'y' if len(loaded) == 1 else 'ies'}"
    )
