"""A kernel table of a few full-batch decode steps of a serving run (`moska.bench.serve
--profile-steps N`): which kernels a routed decode step's device time goes to.

The profiled steps run eagerly (the runner's CUDA graphs set aside for them, so the
profiler sees every kernel rather than one graph launch); the kernels are the ones a
replay runs. Those steps are flagged in the step log and left out of the full-batch
figures (serve_steps.phase_figures)."""

from __future__ import annotations

import torch

from moska.engine.cuda_graphs import DecodeGraphs
from moska.engine.llm_engine import LLMEngine


class StepProfiler:
    def __init__(self, engine: LLMEngine, steps: int) -> None:
        self.engine = engine
        self.steps = steps
        self._prof: torch.profiler.profile | None = None
        self._graphs: DecodeGraphs | None = None  # the runner's, set aside while profiling
        self.result: dict | None = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    def start(self) -> None:
        cuda = self.engine.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        self._graphs, self.engine.runner.graphs = self.engine.runner.graphs, None
        acts = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=acts)
        self._prof.__enter__()

    def stop(self, rows: int, top: int = 20) -> None:
        """End the profile of `self.steps` steps of `rows` rows; keep the top kernels."""
        assert self._prof is not None
        cuda = self.engine.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        self.engine.runner.graphs = self._graphs
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
        events.sort(key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events)
        self.result = {
            "steps": self.steps,
            "rows": rows,
            "clock": "device" if cuda else "cpu (dry run)",
            "note": "eager steps (graphs set aside); self time per step, ms",
            "total_ms_per_step": total / 1e3 / self.steps,
            "top": [
                {
                    "name": e.key[:120],
                    "ms_per_step": getattr(e, key) / 1e3 / self.steps,
                    "calls_per_step": e.count / self.steps,
                }
                for e in events[:top]
            ],
        }
