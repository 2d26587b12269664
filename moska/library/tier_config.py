"""A tiered library's configuration (budgets and policies) and its counters.

Split from library/tiers.py (the chunk caches themselves); ``tiers`` re-exports both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from moska.library.chunk_cache import EVICTION_POLICIES

MISS_POLICIES = ("wait", "skip")
PREFETCH_POLICIES = ("none", "next_layer")
SYNC_MODES = ("layer", "step")

_UNITS = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_budget(text: str, field_name: str, fraction_ok: bool) -> tuple[int | None, float | None]:
    """(bytes, None) or (None, fraction) from a budget: a number with a unit (512MiB, 8G,
    4096B), a plain number of GiB (> 1), or, where `fraction_ok`, a share of free memory
    (a plain number <= 1)."""
    t = str(text).strip().upper().replace("IB", "").replace(" ", "")
    unit = _UNITS.get(t[-1:]) if t[-1:].isalpha() else None
    try:
        value = float(t[:-1] if unit else t)
    except ValueError:
        value = -1.0
    if not value > 0 or (unit is None and not t):
        raise ValueError(
            f"{field_name} must be a size (e.g. 8GiB, 512MiB, or a number of GiB)"
            + (" or a share of free memory (0 < x <= 1)" if fraction_ok else "")
            + f", got {text!r}"
        )
    if unit is not None:
        return int(value * unit), None
    if fraction_ok and value <= 1:
        return None, value
    return int(value * (1 << 30)), None


@dataclass(frozen=True)
class TierConfig:
    """gpu_budget: the library's GPU chunk cache, all layers together: a size ("8GiB",
    "512MiB", "20" = 20 GiB) or a share of free device memory ("0.3"). cpu_budget: pinned
    CPU memory, a size; None holds the whole library on CPU, "0" reads every GPU miss from
    disk (through a small staging ring). sync: when the host learns a layer's routed chunks:
    "layer" (before its launch, one read per layer: the "wait" policy's fetches and the
    "skip" policy's immediate swap) or "step" (the skip policy runs sync-free: absent chunks
    read as empty, the counts are read once per step and their misses fetched for later
    steps, library/tier_ledger.py). A layer whose cache holds every chunk is sync-free
    under either."""

    gpu_budget: str
    cpu_budget: str | None = None
    eviction: str = "lfu"
    miss_policy: str = "wait"
    prefetch: str = "next_layer"
    sync: str = "layer"

    def __post_init__(self) -> None:
        parse_budget(self.gpu_budget, "library_gpu_budget", fraction_ok=True)
        if self.cpu_budget is not None and str(self.cpu_budget).strip() not in ("0", "0.0"):
            parse_budget(self.cpu_budget, "library_cpu_budget", fraction_ok=False)
        for name, value, allowed in (
            ("library_eviction", self.eviction, EVICTION_POLICIES),
            ("library_miss_policy", self.miss_policy, MISS_POLICIES),
            ("library_prefetch", self.prefetch, PREFETCH_POLICIES),
            ("library_tier_sync", self.sync, SYNC_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def gpu_bytes(self, device: torch.device) -> int:
        nbytes, share = parse_budget(self.gpu_budget, "library_gpu_budget", fraction_ok=True)
        if nbytes is not None:
            return nbytes
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
        else:
            free = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        assert share is not None  # parse_budget gives bytes or a share
        return int(share * free)

    def cpu_bytes(self) -> int | None:
        if self.cpu_budget is None:
            return None
        if str(self.cpu_budget).strip() in ("0", "0.0"):
            return 0
        return parse_budget(self.cpu_budget, "library_cpu_budget", fraction_ok=False)[0]


@dataclass
class TierStats:
    """Counters since load, per tier: chunk hits and misses, bytes moved into the tier."""

    hits: dict[str, int] = field(default_factory=lambda: {"gpu": 0, "cpu": 0})
    misses: dict[str, int] = field(default_factory=lambda: {"gpu": 0, "cpu": 0})
    bytes_in: dict[str, int] = field(default_factory=lambda: {"gpu": 0, "cpu": 0})
    skipped: int = 0  # routed chunk selections dropped by the "skip" policy
    prefetched: int = 0  # chunks fetched ahead by the prefetch

    def as_dict(self) -> dict:
        return {
            "hits": dict(self.hits),
            "misses": dict(self.misses),
            "bytes_in": dict(self.bytes_in),
            "skipped": self.skipped,
            "prefetched": self.prefetched,
        }
