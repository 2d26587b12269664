"""Where a FlexiCache engine's decode steps spend their time (`flexicache_engine_speed.py
--profile-steps N`): N more `engine.step()` calls after the timed ones under
`torch.profiler` (CPU and, on CUDA, the device), summed by op, per kind of step.

Why: the timed steps' wall clock says that re-ranking and later hand-off steps cost 5-15
plain steps each on the H200, not whether the host (Python and launches) or the device
(the fetches from pinned host memory, sorts) is the bottleneck; the profile says which ops
take the time. The steps are run with a sync after each (so each one's device time is its
own); their wall times are kept beside the profile (not comparable to the timed steps')."""

from __future__ import annotations

import time
from typing import Any

import torch


def profile_steps(engine, n_steps: int, top: int = 20) -> dict[str, Any]:
    """Run `n_steps` engine steps under the profiler: the ops with the most self CPU and
    self device time, and each step's kind (re-ranking due, later hand-offs made) and wall
    time (synced)."""
    from torch.profiler import ProfilerActivity, profile

    flexi = engine.runner.flexi
    cuda = torch.cuda.is_available() and engine.runner.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps: list[dict[str, Any]] = []
    with profile(activities=acts) as prof:
        for _ in range(n_steps):
            due = flexi is not None and flexi.clock % flexi.cfg.rerank_interval == 0
            ext = flexi.extensions if flexi is not None else 0
            t = time.perf_counter()
            engine.step()
            host = time.perf_counter() - t
            if cuda:
                torch.cuda.synchronize()
            steps.append({
                "rerank_due": due, "host_ms": round(1e3 * host, 2),
                "synced_ms": round(1e3 * (time.perf_counter() - t), 2),
                "extensions": (flexi.extensions - ext) if flexi is not None else 0,
            })  # fmt: skip
    avg = prof.key_averages()
    dev_key = "self_device_time_total" if cuda else "self_cpu_time_total"

    def rows(key: str) -> list[dict[str, Any]]:
        evs = sorted(avg, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:top]
        return [
            {
                "op": e.key, "calls": e.count,
                "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
                "self_device_ms": round((getattr(e, "self_device_time_total", 0) or 0) / 1e3, 3),
            }
            for e in evs
        ]  # fmt: skip

    total_calls = sum(e.count for e in avg)
    return {
        "steps": steps,
        "op_calls": total_calls,
        "top_self_cpu": rows("self_cpu_time_total"),
        "top_self_device": rows(dev_key) if cuda else [],
        "self_cpu_ms_total": round(sum(e.self_cpu_time_total for e in avg) / 1e3, 2),
        "self_device_ms_total": round(
            sum(getattr(e, "self_device_time_total", 0) or 0 for e in avg) / 1e3, 2
        ),
    }
