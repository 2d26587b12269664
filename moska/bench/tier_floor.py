"""The floor of a tiered decode step: what PCIe allows, before any policy.

A tiered step cannot take less than the all-resident step's compute, nor less than the
time to copy the bytes it misses: t_tier >= max(t_resident, t_tier_overhead, missing / H2D)
(perfect overlap of copies with compute). So tokens/s relative to all-resident is at most
t_resident / that, and a target ratio r needs missing bytes per step <= t_resident / r x
H2D, i.e. a GPU hit rate over the step's demanded bytes of 1 - that / demanded. When the
batch's selections cover every chunk each step (B = 256, top-k of a few dozen chunks), the
demanded bytes are the whole library and no eviction policy can raise the hit rate above
the resident share: only fewer demanded chunks per step (scheduling, routing) can.
"""

from __future__ import annotations

import time

import torch


def h2d_bytes_per_s(device: torch.device, nbytes: int = 1 << 30, reps: int = 3) -> float:
    """Measured pinned-host -> device copy bandwidth (bytes/s); on CPU a plain copy's."""
    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=cuda)  # warm
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=cuda)
    if cuda:
        torch.cuda.synchronize(device)
    return reps * nbytes / (time.perf_counter() - t0)


def floor(
    t_resident: float,
    missing_bytes: float,
    h2d: float,
    t_overhead: float = 0.0,
) -> float:
    """Upper bound of tokens/s vs all-resident for a tiered step that misses
    `missing_bytes` (same requests per step; `t_overhead`: the tiered path's step with
    every chunk resident, its bookkeeping and host syncs)."""
    t = max(t_resident, t_overhead, missing_bytes / h2d)
    return t_resident / t


def needed(target: float, t_resident: float, h2d: float, demanded_bytes: float) -> dict[str, float]:
    """What a target ratio needs: the most bytes a step may miss and the GPU hit rate over
    the step's demanded bytes that this is."""
    budget = t_resident / target * h2d
    return {
        "max_missing_bytes_per_step": budget,
        "max_missing_share_of_demand": min(1.0, budget / demanded_bytes),
        "needed_hit_rate": max(0.0, 1.0 - budget / demanded_bytes),
    }
