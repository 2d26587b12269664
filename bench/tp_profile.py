"""Where a decode step's time goes, on rank 0 of an engine (tensor-parallel or not):
bench/tp_decode.py's `--profile`.

B requests are started together and stepped until every one is decoding (prefills, which
run eagerly under tensor parallelism, are over); then `steps` engine steps are timed one
by one with rank 0's host time split into its parts (timers wrapped around the engine's
own methods for the run):

- schedule: the scheduler's choice of the step;
- launch: the step's inputs, the CUDA-graph replay or eager forward being queued, and with
  tensor parallelism the control message to the other ranks (`send`, a part of launch) and
  the logits or argmax gather being queued (`head`: compute_logits / greedy_tokens);
- finish: waiting for the previous step's tokens (the device's time shows up here when the
  host is ahead) and turning them into outputs;
- other: the rest of engine.step.

Then `profile_steps` more steps run under torch.profiler (CPU, and CUDA on a GPU): the top
ops by self CPU time and by self device time, per step. The requests are aborted after.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

PARTS = ("schedule", "launch", "send", "head", "finish")


def _timed(obj: Any, name: str, acc: dict[str, float], part: str) -> Callable[[], None]:
    """Wrap obj.name (an instance attribute over the method) to add its wall ms to acc[part];
    returns the undo."""
    real = getattr(obj, name)

    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return real(*args, **kw)
        finally:
            acc[part] += (time.perf_counter() - t) * 1e3

    setattr(obj, name, wrapper)
    return lambda: delattr(obj, name)


def _top(prof, key: str, steps: int, n: int = 15) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0.0)
        rows.append({
            "name": e.key[:120], "calls_per_step": round(e.count / steps, 2),
            "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 4),
            "self_device_ms_per_step": round(dev / 1e3 / steps, 4),
        })  # fmt: skip
    rows.sort(key=lambda r: r[key], reverse=True)
    return [r for r in rows[:n] if r[key] > 0]


def steady_decode(
    llm, batch: int, prompt: int, vocab: int, max_tokens: int, steps: int, profile_steps: int
) -> dict:
    """Per-step wall ms (median, p90) and its split over `steps` steady decode steps of B
    rows, then a torch.profiler summary of `profile_steps` more (0: none). `max_tokens`:
    each request's (more than the ramp and all the steps: the batch stays whole)."""
    from moska.engine.sampling_params import SamplingParams

    eng = llm.engine
    gen = torch.Generator().manual_seed(1000 + batch)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"steady-{batch}-{i}" for i in range(batch)]
    for rid, p in zip(ids, torch.randint(0, vocab, (batch, prompt), generator=gen).tolist()):
        eng.add_request(rid, p, params)
    reqs = [eng._tracked[r].request for r in ids]
    ramp = 0
    while min(r.num_output_tokens for r in reqs) < 3:  # every prefill done, then 2 decodes
        eng.step()
        ramp += 1
    acc = dict.fromkeys(PARTS, 0.0)
    runner, model = eng.runner, eng.runner.model
    undo = [
        _timed(eng.scheduler, "schedule", acc, "schedule"),
        _timed(runner, "launch", acc, "launch"),
        _timed(eng, "_finish", acc, "finish"),
        _timed(model, "compute_logits", acc, "head"),
    ]
    if hasattr(model, "greedy_tokens"):
        undo.append(_timed(model, "greedy_tokens", acc, "head"))
    driver = getattr(model, "driver", None)
    if driver is not None:
        undo += [_timed(driver, n, acc, "send") for n in ("send_graph_step", "send_forward")]
    walls, split = [], []
    replays = getattr(runner.graphs, "replays", None)
    try:
        for _ in range(steps):
            for k in acc:
                acc[k] = 0.0
            t = time.perf_counter()
            eng.step()
            walls.append((time.perf_counter() - t) * 1e3)
            split.append(dict(acc))
    finally:
        for u in undo:
            u()
    replayed = None if replays is None else getattr(runner.graphs, "replays", 0) - replays
    out: dict[str, Any] = {
        "batch": batch,
        "ramp_steps": ramp,
        "steps": steps,
        "graph_replays": replayed,
        "ms_per_step_median": round(statistics.median(walls), 3),
        "ms_per_step_p90": round(sorted(walls)[int(0.9 * (len(walls) - 1))], 3),
        "split_ms_median": {k: round(statistics.median(s[k] for s in split), 3) for k in PARTS},
    }
    med = out["split_ms_median"]  # send and head are parts of launch
    med["other"] = round(
        out["ms_per_step_median"] - med["schedule"] - med["launch"] - med["finish"], 3
    )
    if profile_steps:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU]
        if torch.cuda.is_available() and llm.engine.runner.device.type == "cuda":
            acts.append(ProfilerActivity.CUDA)
        try:
            with profile(activities=acts) as prof:
                for _ in range(profile_steps):
                    eng.step()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
            out["profile"] = {
                "steps": profile_steps,
                "activities": [a.name for a in acts],
                "top_self_cpu": _top(prof, "self_cpu_ms_per_step", profile_steps),
                "top_self_device": _top(prof, "self_device_ms_per_step", profile_steps),
            }
        except Exception as e:  # noqa: BLE001 - the timed steps above still count
            out["profile_error"] = repr(e)
    for rid in ids:
        eng.abort_request(rid)
    while eng.has_unfinished_requests():
        eng.step()
    return out
