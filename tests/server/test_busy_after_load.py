"""`Load.busy_s` (how long the engine's step in progress has run, which admission reads as
the step overrunning its prediction) counts from the end of a library load handed over in
the same loop iteration, not from the iteration's start: a load is a one-off, not a slow
step (a GPU server's first burst after its library was unloaded, session 23)."""

import asyncio
import threading
import time

from fake_engine import FakeEngine

from moska.engine.sampling_params import SamplingParams
from moska.server.async_engine import AsyncEngine
from moska.server.queue_replay import RequestCost

LOAD_S = 0.4  # the simulated library load


class _LoadingEngine(FakeEngine):
    """Adding a request of a library not loaded yet takes LOAD_S (the load); each step
    waits for the test to let it finish."""

    def __init__(self, add_s: float = 0.0) -> None:
        super().__init__()
        self.add_s = add_s  # every hand-over's own time (not a load)
        self.loaded: list[str] = []
        self.libraries = type("Libs", (), {"loaded_names": lambda _: list(self.loaded)})()
        self.in_step = threading.Event()
        self.release = threading.Event()

    def add_request(self, request_id, prompt, params, *, library=None, **kw):
        if library is not None and library not in self.loaded:
            time.sleep(LOAD_S)  # the load itself: what is timed, not a state waited on
            self.loaded.append(library)
        time.sleep(self.add_s)
        super().add_request(request_id, prompt, params, **kw)

    def step(self):
        self.in_step.set()
        assert self.release.wait(10), "the test never released the step"
        return super().step()


def _busy_during_first_step(library: str | None, add_s: float = 0.0) -> float:
    engine = _LoadingEngine(add_s)

    async def run() -> float:
        aengine = AsyncEngine(engine, idle_wait_s=0.01)
        aengine.start()
        cost = RequestCost(5, 2, 100 if library else 0, 5000 if library else 0)
        add = asyncio.ensure_future(
            aengine.add_requests(
                ["r"], "hello", [SamplingParams(max_tokens=2)], 5, library=library, cost=cost
            )
        )
        assert await asyncio.to_thread(engine.in_step.wait, 10), "no step began"
        busy = aengine.load().busy_s
        engine.release.set()
        await add
        return busy

    return asyncio.run(run())


def test_a_library_load_is_not_the_step_running_long():
    t0 = time.perf_counter()
    busy = _busy_during_first_step("lib")
    assert time.perf_counter() - t0 >= LOAD_S  # the load did happen in that iteration
    assert 0.0 <= busy < LOAD_S / 2, busy


def test_a_hand_over_without_a_load_still_counts():
    # handing requests over is part of the iteration admission waits for (async_engine)
    assert _busy_during_first_step(None, add_s=0.2) >= 0.2
