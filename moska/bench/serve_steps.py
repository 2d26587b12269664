"""Where a serving run's time goes, step by step (`moska.bench.serve`): each `engine.step()`
call's wall time, its rows, whether it computed prompt tokens, whether it ran ahead of its
tokens, and its host split (scheduling, queueing the forward, waiting for tokens). From
these: the decode phase's output tokens/s (steps without prompt tokens) beside the
whole run's, and the full-batch decode step time, for the prefix-cached baseline and the
routed library alike.

Why: the whole run's output tokens/s of a burst mixes two phases. With 256 requests of
256 own tokens and 64 generated, the prefill phase (the baseline's over a 127K-token
prefix) is most of the routed run, so the whole-run ratio measures prefill as much as
serving; the decode phase is what a server under steady load does at B = 256.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from moska.bench.serve_profile import StepProfiler
from moska.engine.llm_engine import LLMEngine


@dataclass
class StepRecord:
    seconds: float  # the step() call, wall
    rows: int  # requests the step scheduled
    prompt_tokens: int  # prompt tokens this step computed (0: a decode step)
    tokens: int  # output tokens step() returned
    ran_ahead: bool  # queued without waiting for its tokens (asynchronous scheduling)
    library_async: bool  # engine.async_library_steps during the step
    schedule_s: float  # host: the scheduler
    launch_s: float  # host: inputs and queueing the forward (a graph replay or eager)
    wait_s: float  # host blocked for tokens (device time not hidden behind host work)
    profiled: bool = False  # run eagerly under the profiler (serve_profile): not timed


class StepRecorder:
    """Wraps one engine's scheduler.schedule, runner.launch and the pending steps' result()
    to time them; `step()` replaces engine.step in the bench's loop. `sync_steps`: the
    first that many decode steps (no prompt tokens) run with library steps synchronous
    (engine.async_library_steps False), an A/B inside the same run; `profile_steps`: the
    next that many decode steps profiled (serve_profile.StepProfiler, `self.profile`)."""

    def __init__(self, engine: LLMEngine, sync_steps: int = 0, profile_steps: int = 0) -> None:
        self.engine = engine
        self.records: list[StepRecord] = []
        self.sync_steps = sync_steps
        self.profiler = StepProfiler(engine, profile_steps) if profile_steps else None
        self.profile: dict | None = None  # the last run's kernel table
        self._acc = {"schedule": 0.0, "launch": 0.0, "wait": 0.0}
        self._scheduled = 0  # rows the last schedule() put in its step
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.runner, "launch", "launch", pending=True)

    def _wrap(self, obj, name: str, key: str, pending: bool = False) -> None:
        real = getattr(obj, name)
        acc = self._acc

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = real(*args, **kwargs)
            acc[key] += time.perf_counter() - t0
            if key == "schedule":
                self._scheduled = len(out.scheduled)
            if pending:  # the step's result() blocks for its tokens: time that too
                result = out.result

                def waited():
                    t1 = time.perf_counter()
                    r = result()
                    acc["wait"] += time.perf_counter() - t1
                    return r

                out.result = waited
            return out

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.records.clear()
        self.profile = None

    def step(self):
        e = self.engine
        decode_steps = sum(r.prompt_tokens == 0 for r in self.records)
        if self.sync_steps:  # decode steps only ever run ahead: count those
            e.async_library_steps = decode_steps >= self.sync_steps
        prof = self.profiler
        profiling = prof is not None and self.profile is None
        profiling = profiling and decode_steps >= self.sync_steps and self.records
        if profiling and not prof.active and self.records[-1].prompt_tokens == 0:
            prof.start()
        before = e.stats().prompt_tokens_computed
        for k in self._acc:
            self._acc[k] = 0.0
        self._scheduled = 0
        t0 = time.perf_counter()
        outs = e.step()
        seconds = time.perf_counter() - t0
        self.records.append(
            StepRecord(
                seconds=seconds,
                rows=self._scheduled,
                prompt_tokens=e.stats().prompt_tokens_computed - before,
                tokens=sum(len(o.new_token_ids) for o in outs),
                ran_ahead=e._in_flight is not None,
                library_async=e.async_library_steps,
                schedule_s=self._acc["schedule"],
                launch_s=self._acc["launch"],
                wait_s=self._acc["wait"],
                profiled=prof is not None and prof.active,
            )
        )
        if prof is not None and prof.active:
            done = [r for r in self.records if r.profiled]
            if len(done) >= prof.steps:
                prof.stop(done[0].rows)
                self.profile = prof.result
        return outs

    def finish(self) -> None:
        """After a run: library steps back to running ahead, a profile cut short ended."""
        self.engine.async_library_steps = True
        prof = self.profiler
        if prof is not None and prof.active:  # the run ended within the profiled steps
            prof.steps = max(1, sum(r.profiled for r in self.records))
            prof.stop(next((r.rows for r in self.records if r.profiled), 0))
            self.profile = prof.result


def _p50(values: list[float]) -> float | None:
    return float(np.percentile(values, 50)) if values else None


def phase_figures(records: list[StepRecord], batch: int) -> dict:
    """The run's phases from its steps: prefill (steps with prompt tokens) and decode
    (without), each's seconds and output tokens/s; full-batch decode steps (`batch` rows,
    no prompt tokens): their p50 wall time and host split, also per library mode (the
    A/B of StepRecorder.sync_steps)."""
    pre = [r for r in records if r.prompt_tokens > 0]
    dec = [r for r in records if r.prompt_tokens == 0]
    full = [r for r in dec if r.rows == batch and not r.profiled]
    out: dict = {
        "steps": len(records),
        "prefill_steps": len(pre),
        "prefill_seconds": sum(r.seconds for r in pre),
        "decode_steps": len(dec),
        "decode_seconds": sum(r.seconds for r in dec),
        "decode_tokens": sum(r.tokens for r in dec),
    }
    out["decode_output_tokens_per_s"] = (
        out["decode_tokens"] / out["decode_seconds"] if out["decode_seconds"] > 0 else None
    )
    out["full_batch_decode_steps"] = len(full)
    out["full_batch_decode_step_p50_s"] = _p50([r.seconds for r in full])
    step = out["full_batch_decode_step_p50_s"]
    out["full_batch_decode_tokens_per_s"] = batch / step if step else None
    for key in ("schedule_s", "launch_s", "wait_s"):
        out[f"full_batch_{key.removesuffix('_s')}_p50_s"] = _p50([getattr(r, key) for r in full])
    out["full_batch_ran_ahead_share"] = sum(r.ran_ahead for r in full) / len(full) if full else None
    by_mode = {}
    for mode, name in ((True, "library_async"), (False, "library_sync")):
        rs = [r for r in full if r.library_async == mode]
        if rs:
            by_mode[name] = {
                "steps": len(rs),
                "step_p50_s": _p50([r.seconds for r in rs]),
                "wait_p50_s": _p50([r.wait_s for r in rs]),
                "ran_ahead_share": sum(r.ran_ahead for r in rs) / len(rs),
            }
    out["full_batch_by_library_mode"] = by_mode
    return out


def step_log(records: list[StepRecord]) -> list[dict]:
    """Every step, compact (milliseconds rounded to 0.01)."""
    rows = []
    for r in records:
        d = asdict(r)
        for k in ("seconds", "schedule_s", "launch_s", "wait_s"):
            d[k] = round(d[k] * 1e3, 2)
        d["ms"] = d.pop("seconds")
        rows.append(d)
    return rows


def phase_line(p: dict) -> str:
    """One printed line: prefill and decode phases, the full-batch decode step."""
    step = p["full_batch_decode_step_p50_s"]
    line = (
        f"prefill {p['prefill_steps']} steps {p['prefill_seconds']:.2f} s, "
        f"decode {p['decode_steps']} steps {p['decode_output_tokens_per_s'] or 0:.0f} tok/s, "
        f"full-batch step p50 {1e3 * (step or 0):.1f} ms "
        f"(wait {1e3 * (p['full_batch_wait_p50_s'] or 0):.1f} ms)"
    )
    for mode, m in p["full_batch_by_library_mode"].items():
        line += f" {mode} {1e3 * m['step_p50_s']:.1f} ms"
    return line
