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


def from_result(path: str, target: float = 0.8) -> dict:
    """The floor of each tiered mode of a moska.bench.tiers JSON, H2D taken as the rate its
    waiting modes achieved (bytes moved / step time) when the run did not measure it."""
    import json
    from pathlib import Path

    res = json.loads(Path(path).read_text())
    steps = res["config"]["steps"]
    lib = res["shapes"]["library_gib"] * 2**30
    out: dict = {"source": path, "target": target}
    for dist in res["summary"]:
        rows = {r["mode"]: r for r in res["rows"] if r.get("dist") == dist}
        if "resident" not in rows:
            continue
        t_res = rows["resident"]["seconds"] / steps
        waits = [
            r for r in rows.values() if r["mode"].endswith("-wait") and r["gpu_bytes_per_step"]
        ]
        h2d = res["summary"].get("h2d_gib_per_s", 0) * 2**30 or max(
            r["gpu_bytes_per_step"] / (r["seconds"] / steps) for r in waits
        )
        out[dist] = {
            "resident_step_s": t_res,
            "h2d_gib_per_s": h2d / 2**30,
            f"for_{target}x": needed(target, t_res, h2d, lib),
            "modes": {
                m: {
                    "measured_ratio": r["tokens_per_s"] / rows["resident"]["tokens_per_s"],
                    "floor_ratio": floor(t_res, r["gpu_bytes_per_step"], h2d),
                    "gib_per_step": r["gpu_bytes_per_step"] / 2**30,
                }
                for m, r in rows.items()
                if m != "resident"
            },
        }
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(from_result(sys.argv[1]), indent=1))
