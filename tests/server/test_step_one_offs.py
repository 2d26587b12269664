"""A step that compiled a Triton kernel (`LLMEngine.last_step_compiled`, compile_watch) or
captured a CUDA graph is a one-off: the async engine hands it to admission as warm-up, so
it moves neither the slowdown factor nor the step-time fit (session 25: a fresh GPU
server's first mixed decode steps ran 1.2-1.6 s against 0.03 s predicted)."""

import asyncio
import threading

from fake_engine import FakeEngine

from moska.engine.sampling_params import SamplingParams
from moska.server.admission import AdmissionController
from moska.server.async_engine import AsyncEngine


class _Recorder(AdmissionController):
    def __init__(self) -> None:
        super().__init__(5.0, None)
        self.seen: list[bool] = []
        self.all_seen = threading.Event()

    def observe_step(self, seconds, features, warmup=False):
        self.seen.append(warmup)
        super().observe_step(seconds, features, warmup)
        if len(self.seen) >= 3:
            self.all_seen.set()


class _OneOffEngine(FakeEngine):
    """Its steps report, in turn, a kernel compile, a graph capture, then neither."""

    def __init__(self) -> None:
        super().__init__()
        self.flags = [("last_step_compiled", True), ("last_step_captured_graph", True)]
        self.last_step_compiled = self.last_step_captured_graph = False

    def step(self):
        self.last_step_compiled = self.last_step_captured_graph = False
        if self.flags:
            name, value = self.flags.pop(0)
            setattr(self, name, value)
        return super().step()


def test_a_step_that_compiled_or_captured_is_warmup_for_admission():
    engine, admission = _OneOffEngine(), _Recorder()

    async def run() -> None:
        aengine = AsyncEngine(engine, admission=admission, idle_wait_s=0.01)
        aengine.start()
        try:
            await aengine.add_requests(["r"], "hello", [SamplingParams(max_tokens=4)], 5)
            assert await asyncio.to_thread(admission.all_seen.wait, 10), admission.seen
        finally:
            await aengine.shutdown()

    asyncio.run(run())
    assert admission.seen[:3] == [True, True, False]


def test_the_watch_counts_each_cache_miss_and_keeps_the_hook_before_it(monkeypatch):
    triton = __import__("pytest").importorskip("triton")
    from moska.engine import compile_watch

    runtime = triton.knobs.runtime
    calls: list[dict] = []

    def previous(**kwargs):
        calls.append(kwargs)
        return "verdict"

    monkeypatch.setattr(runtime, "jit_cache_hook", previous)
    monkeypatch.setattr(compile_watch, "_installed", False)
    assert compile_watch.install() and compile_watch.install()  # idempotent
    before = compile_watch.count()
    hook = runtime.jit_cache_hook
    assert hook is not previous
    assert hook(key="k", repr="kernel", fn=None) == "verdict"  # chained, verdict kept
    assert hook(key="k2", repr="kernel", fn=None) == "verdict"
    assert compile_watch.count() == before + 2
    assert [c["key"] for c in calls] == ["k", "k2"]
