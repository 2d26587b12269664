"""Where a FlexiCache engine's decode steps spend their time (`flexicache_engine_speed.py
--profile-steps N`): N more `engine.step()` calls after the timed ones under
`torch.profiler` (CPU and, on CUDA, the device), summed by op, per kind of step.

Why: the timed steps' wall clock says that re-ranking and later hand-off steps cost 5-15
plain steps each on the H200, not whether the host (Python and launches) or the device
(the fetches from pinned host memory, sorts) is the bottleneck; the profile says which ops
take the time. The steps are run with a sync after each (so each one's device time is its
own); their wall times are kept beside the profile (not comparable to the timed steps')."""

from __future__ import annotations

import cProfile
import pstats
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
    py = cProfile.Profile()
    with profile(activities=acts) as prof:
        for _ in range(n_steps):
            due = flexi is not None and flexi.clock % flexi.cfg.rerank_interval == 0
            ext = flexi.extensions if flexi is not None else 0
            t = time.perf_counter()
            if due:  # Python's own time too: which functions the host spends it in
                py.enable()
            engine.step()
            py.disable()
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
        "rerank_python": _python_top(py, top),
        "steps": steps,
        "op_calls": total_calls,
        "top_self_cpu": rows("self_cpu_time_total"),
        "top_self_device": rows(dev_key) if cuda else [],
        "self_cpu_ms_total": round(sum(e.self_cpu_time_total for e in avg) / 1e3, 2),
        "self_device_ms_total": round(
            sum(getattr(e, "self_device_time_total", 0) or 0 for e in avg) / 1e3, 2
        ),
    }


def _python_top(py: cProfile.Profile, top: int) -> dict[str, list[list[Any]]]:
    """The re-ranking steps' Python functions with the most own and cumulative time:
    [file:line(function), calls, ms]."""
    try:
        st = pstats.Stats(py)
    except TypeError:  # nothing was profiled
        return {"tottime": [], "cumtime": []}
    rows = st.stats  # type: ignore[attr-defined]
    out = {}
    for key, idx in (("tottime", 2), ("cumtime", 3)):
        best = sorted(rows.items(), key=lambda kv: kv[1][idx], reverse=True)[:top]
        out[key] = [
            [
                f"{f.rsplit('/', 2)[-1] if '/' in f else f}:{line}({fn})",
                v[1],
                round(1e3 * v[idx], 2),
            ]
            for (f, line, fn), v in best
        ]
    return out
