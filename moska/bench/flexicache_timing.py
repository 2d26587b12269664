"""Decode-step timing for the FlexiCache speed bench (`flexicache_speed.py`): the timed loop,
a device-only time per step, and freeing one row's memory before the next.

Why a device-only time: the bench runs the model eagerly from Python, one launch per op
(about 15 per layer, 32 layers). Its wall time per step is then set by the host's issue
rate whenever the host issues slower than the GPU runs, and the host's speed differs from
machine to machine and minute to minute: the same full-KV step took 19.4 ms in the first
H200 run and 36.1 ms in a later one, with unchanged model and kernel code, and in that later
run FlexiCache at B=15 took 44.5 ms a step against 22.4 ms at B=38 (more work, less time):
every row had `host_issue_ms_median` equal to its step time. `device_ms` removes the host:
the GPU is held busy by a sleep kernel while the host issues the whole step, so the step's
kernels then run back to back; CUDA events after the sleep and after the step give their
time. A probe is valid only if the host finished issuing before the sleep ended (the event
after the sleep not yet reached), which is checked and reported (`device_probe_valid`).
A step that waits on the device inside (a re-ranking reads its layers' counts after its last
layer, and a pool that must grow reads once more) is probed the same way with a longer sleep
(twice that kind's wall time): `wait_hook` tells the probe when the host is about to wait,
and the probe is valid if the GPU was still asleep at the first wait (every layer queued
before the GPU started). Its time still holds the host's work after each wait (compaction,
the logits: the GPU idles meanwhile), so it is an upper bound of the step's device time.
"""

from __future__ import annotations

import gc
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch

from moska.flexicache.host_reads import HostReads, count_host_reads

GPU_HZ = 2.0e9  # sleep-kernel cycles per second (H200 boost ~1.98 GHz; longer is harmless)


def whole_periods(steps: int, r: int, block_size: int) -> int:
    """`steps` rounded up to whole periods of lcm(r, block_size): over them every kind of
    step (plain, page start, re-ranking) occurs in its real proportion, so the mean step
    time is the long-run mean, whatever step the timing starts at."""
    period = math.lcm(r, block_size)
    return max(1, -(-steps // period)) * period


def release(device: torch.device) -> dict:
    """Free what the last row left (its store sits in reference cycles: gc), return cached
    device memory and cached pinned host blocks, and report what stays held."""
    gc.collect()
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    for name in ("_host_emptyCache", "_accelerator_emptyHostCache"):
        fn = getattr(torch._C, name, None)
        if fn is not None:
            fn()
            break
    return host_stats(device)


def host_stats(device: torch.device) -> dict:
    """Pinned host memory of torch's caching host allocator, GiB: owned (in use + cached) and
    in use."""
    if device.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
        return {}
    try:
        stats = torch.cuda.host_memory_stats()
    except RuntimeError:
        return {}
    names = {
        "allocated_bytes.current": "pinned_owned_gib",
        "active_bytes.current": "pinned_active_gib",
    }
    return {n: round(stats[k] / 2**30, 3) for k, n in names.items() if k in stats}


@contextmanager
def _cpu_reads(on: bool) -> Iterator[HostReads]:
    if not on:
        yield HostReads()
        return
    with count_host_reads() as n:
        yield n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode(
    step: Callable[[torch.Tensor], torch.Tensor],
    begin: Callable[[], str],
    tokens: torch.Tensor,
    steps: int,
    warmup: int,
    r: int,
    reset: Callable[[], None] | None = None,
    snap: Callable[[], dict] | None = None,
    probes: int = 0,
    wait_hook: Callable[[Callable[[], None] | None], None] | None = None,
) -> dict:
    """Timed decode steps after `warmup`: mean and median wall seconds per step, by kind, and
        the host's issue time; then 2 r untimed steps counting the waits torch flags (CUDA; on
        CPU the host reads of tensor values that would wait: `host_reads.count_host_reads`), and
        `probes` steps timed on the device alone (see the module docstring). `begin()` starts a
        step and names its kind; `step(tokens)` runs it (next tokens); `reset()` runs after the
        warmup, `snap()` (counters) right after the timed steps. `wait_hook(fn)` makes the step
    call `fn()` before each wait on the device (None: no more calls); without it, steps that
    wait are not probed."""
    device = tokens.device
    cuda = device.type == "cuda"
    cpu0, wall0 = time.process_time(), time.perf_counter()
    times: list[float] = []
    issue: list[float] = []
    kinds: dict[str, list[float]] = {}
    syncs: dict[str, list[int]] = {}
    snapped: dict = {}
    counted = warmup + steps + 2 * r
    for i in range(counted):
        if i == warmup and reset is not None:
            reset()
        if i == warmup + steps and snap is not None:
            snapped = snap()
        timed = warmup <= i < warmup + steps
        count = i >= warmup + steps
        with warnings.catch_warnings(record=True) as caught, _cpu_reads(count and not cuda) as n:
            if count and cuda:  # only untimed steps run under sync debug mode
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            kind = begin()
            _sync(device)
            t = time.perf_counter()
            tokens = step(tokens)
            t_issue = time.perf_counter()
            if count and cuda:
                torch.cuda.set_sync_debug_mode("default")
            _sync(device)
        if timed:
            times.append(time.perf_counter() - t)
            issue.append(t_issue - t)
            kinds.setdefault(kind, []).append(times[-1])
        elif count:
            syncs.setdefault(kind, []).append(len(caught) if cuda else n.n)
    if not snapped and snap is not None:
        snapped = snap()
    issue_median = sorted(issue)[len(issue) // 2]
    kind_s = {k: max(v) for k, v in kinds.items()}  # each kind's longest timed step
    host = {  # other processes on the host, and this one's CPU use (threads add up)
        "host_load_avg_1m": round(os.getloadavg()[0], 2),
        "process_cpu_per_wall": round(
            (time.process_time() - cpu0) / (time.perf_counter() - wall0), 2
        ),
    }
    device_ms, valid = (
        _probe(step, begin, tokens, probes, issue_median, kind_s, wait_hook) if cuda else ({}, 0.0)
    )
    return {
        "snap": snapped,
        "mean": sum(times) / len(times),
        "median": sorted(times)[len(times) // 2],
        "issue_median": issue_median,
        "by_kind_ms": _means_ms(kinds),
        "steps_by_kind": {k: len(v) for k, v in kinds.items()},
        "syncs_by_kind": {k: round(sum(v) / len(v), 1) for k, v in syncs.items()},
        "device_ms_by_kind": device_ms,
        "device_probe_valid": valid,
        "host": host,
    }


def device_bound_ms(t: dict) -> float | None:
    """Mean step ms of a `decode` result with each kind's device-only time (wall time where
    none: re-rankings), weighted by the timed steps' kinds (whole periods: their real
    proportion)."""
    if not t["device_ms_by_kind"]:
        return None
    n = t["steps_by_kind"]
    ms = {k: t["device_ms_by_kind"].get(k, t["by_kind_ms"][k]) for k in n}
    return round(sum(n[k] * ms[k] for k in n) / sum(n.values()), 3)


def _means_ms(by_kind: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(sum(v) / len(v) * 1e3, 3) for k, v in by_kind.items()}


def _note_asleep(asleep: list[bool], start: torch.cuda.Event) -> None:
    asleep.append(not start.query())


def _probe(
    step, begin, tokens, probes, issue_s, kind_s, wait_hook
) -> tuple[dict[str, float], float]:
    """Device-only ms per step kind (re-rankings: only with `wait_hook`, see the module
    docstring) and the share of valid probes."""
    got: dict[str, list[float]] = {}
    valid = tried = 0
    for _ in range(probes):
        kind = begin()
        torch.cuda.synchronize()
        waits = kind == "rerank"
        if waits and wait_hook is None:  # waits on the device inside: run it plainly
            tokens = step(tokens)
            torch.cuda.synchronize()
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        asleep: list[bool] = []  # at each wait: the GPU had not reached the step yet
        if wait_hook is not None:
            wait_hook(partial(_note_asleep, asleep, start))
        busy = 2 * (kind_s.get(kind, issue_s) if waits else issue_s) + 0.01
        torch.cuda._sleep(int(busy * GPU_HZ))
        start.record()
        tokens = step(tokens)
        end.record()
        queued = asleep[0] if asleep else not start.query()
        if wait_hook is not None:
            wait_hook(None)
        end.synchronize()
        tried += 1
        if queued:
            valid += 1
            got.setdefault(kind, []).append(start.elapsed_time(end) / 1e3)
    return _means_ms(got), round(valid / max(tried, 1), 3)


@torch.inference_mode()
def profile_steps(step, begin, tokens: torch.Tensor, n: int, top: int = 15) -> dict:
    """`n` steps under torch.profiler: per step kind, wall ms; and the ops (and the store's
    `flexi.*` ranges) with the most host time and the most device time, ms per step. Where a
    re-ranking step's time goes (host-issued launches, syncs, fetches, sorts)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if tokens.is_cuda:
        acts.append(ProfilerActivity.CUDA)
    kinds: dict[str, list[float]] = {}
    with profile(activities=acts) as prof:
        for _ in range(n):
            kind = begin()
            _sync(tokens.device)
            t = time.perf_counter()
            tokens = step(tokens)
            _sync(tokens.device)
            kinds.setdefault(kind, []).append(time.perf_counter() - t)
    rows = prof.key_averages()

    def dev(e) -> float:
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))

    def table(key) -> list[dict]:
        best = sorted(rows, key=key, reverse=True)[:top]
        return [{"op": e.key, "calls_per_step": round(e.count / n, 1),
                 "self_cpu_ms": round(e.self_cpu_time_total / 1e3 / n, 3),
                 "self_device_ms": round(dev(e) / 1e3 / n, 3)} for e in best]  # fmt: skip

    ranges = [{"range": e.key, "cpu_ms_per_step": round(e.cpu_time_total / 1e3 / n, 3),
               "calls_per_step": round(e.count / n, 1)}
              for e in rows if e.key.startswith("flexi.")]  # fmt: skip
    return {
        "steps": n,
        "step_ms_by_kind": _means_ms(kinds),
        "by_host_time": table(lambda e: e.self_cpu_time_total),
        "by_device_time": table(dev),
        "store_ranges": ranges,
    }
