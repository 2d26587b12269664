"""The engine loop in one background thread, bridged to asyncio.

One thread owns the engine: it alone calls `add_request`, `abort_request`, `step` and any
function submitted with `call` (short library reads; builds run on the build worker,
`server/build_worker.py`). The event loop talks to it through a thread-safe command queue;
outputs go back to per-request asyncio queues with `loop.call_soon_threadsafe`, one call
per step.

Guarantees: a request accepted by the engine is stepped until it finishes or its client
aborts it (no output is dropped); an abort frees the request's KV in the engine; a step
that raises ends only the requests the engine names (`StepFailedError`: the culprit of a
rolled-back step), the others go on; shutdown drains in-flight requests (bounded), then
aborts what is left and joins the thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from moska.engine.errors import StepFailedError
from moska.engine.protocol import ServedEngine
from moska.engine.sampling_params import SamplingParams
from moska.server.admission import AdmissionController, Load, RequestCost
from moska.server.engine_commands import (
    Abort,
    Add,
    Call,
    Stop,
    deliver,
    set_exception,
    set_result,
)
from moska.server.metrics import ServerMetrics
from moska.server.request_stream import EngineDeadError, EngineStepError, RequestStream
from moska.server.step_model import StepFeatures
from moska.server.step_tally import tally_outputs

logger = logging.getLogger(__name__)
# the engine's flags for a step that paid a one-off: a CUDA graph capture, a Triton kernel
# compile (engine/compile_watch.py); admission does not learn its step time from it
ONE_OFF_FLAGS = ("last_step_captured_graph", "last_step_compiled")


class AsyncEngine:
    """Owns the engine thread. Create, `start(loop)`, then use from that loop."""

    def __init__(
        self,
        engine: ServedEngine,
        *,
        metrics: ServerMetrics | None = None,
        admission: AdmissionController | None = None,
        idle_wait_s: float = 0.05,
    ) -> None:
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self.admission = admission or AdmissionController(None, None)
        self._idle_wait_s = idle_wait_s
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending: deque[RequestCost] = deque()  # submitted, not yet handed over
        self._snapshot = Load()
        self._added = 0  # requests handed to the engine since the last step (engine thread)
        self._iter_start = 0.0  # when the engine loop stopped waiting for work
        self._busy_since: float | None = None  # the iteration start of the step running now
        self._iter_warmup = False  # this iteration paid a one-off (a library load)
        # when this iteration's last one-off (a library load) ended: the step in progress
        # counts from then for admission (`Load.busy_s`), so a load is not read as the step
        # running past its prediction
        self._oneoff_end = 0.0
        self._prompt_computed: int | None = None  # engine.stats().prompt_tokens_computed
        self._num_in_flight = 0  # accepted and unfinished, engine thread writes
        self.failed_steps = 0  # steps that raised (their requests got an error)
        self.accepting = True

    # ------------------------------------------------------------ event-loop side

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="moska-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        return self._num_in_flight

    def load(self) -> Load:
        """Engine queue and running batch as of the last step, plus requests submitted
        since (not yet seen by the engine)."""
        with self._lock:
            s, since = self._snapshot, self._busy_since
            busy = 0.0 if since is None else max(0.0, time.perf_counter() - since)
            return Load(s.waiting + tuple(self._pending), s.running, len(self._pending), busy)

    async def add_requests(
        self,
        request_ids: Sequence[str],
        prompt: str | list[int],
        params: Sequence[SamplingParams],
        num_prompt_tokens: int,
        *,
        library: str | Sequence[str] | None = None,
        top_k_chunks: int | None = None,
        report_routing: bool = False,
        queue: asyncio.Queue | None = None,
        cost: RequestCost | None = None,
        predicted_ttft_s: float | None = None,
        arrival: float | None = None,
    ) -> list[RequestStream]:
        """Hand a group of requests (the n choices of one HTTP request) to the engine.
        All are added or none: the engine's ValueError for one aborts the others and is
        raised here. Cancelling the await aborts whatever was added. With `queue`, every
        stream delivers into it (one consumer for several requests)."""
        if not self.accepting or not self.alive:
            raise EngineDeadError("the server is shutting down")
        assert len(request_ids) == len(params)
        loop = self._loop
        assert loop is not None
        future = loop.create_future()
        shared = queue if queue is not None else None
        streams = [
            RequestStream(rid, num_prompt_tokens, shared if shared is not None else asyncio.Queue())
            for rid in request_ids
        ]
        cost = cost or RequestCost(num_prompt_tokens)
        for stream in streams:
            stream.cost, stream.predicted_ttft_s = cost, predicted_ttft_s
            if arrival is not None:  # when the HTTP request arrived: TTFT counts from there
                stream.arrival = arrival
        with self._lock:
            self._pending.extend(cost for _ in streams)
        self._commands.put(
            Add(streams, prompt, list(params), library, top_k_chunks, report_routing, future)
        )
        try:
            await future
        except asyncio.CancelledError:
            self.abort(request_ids)
            raise
        return streams

    def abort(self, request_ids: Sequence[str]) -> None:
        """Abort requests (no-op for finished or unknown ids). Non-blocking."""
        if request_ids and self._thread is not None:
            self._commands.put(Abort(list(request_ids)))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the engine thread between steps and return its result."""
        if not self.alive:
            raise EngineDeadError("the engine loop is not running")
        assert self._loop is not None
        future = self._loop.create_future()
        self._commands.put(Call(fn, future))
        return await future

    async def shutdown(self, drain_s: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `drain_s`, then abort
        the rest and join the engine thread."""
        self.accepting = False
        if self._thread is None:
            return
        deadline = time.monotonic() + drain_s
        while self._num_in_flight > 0 and time.monotonic() < deadline and self.alive:
            await asyncio.sleep(0.02)
        self._commands.put(Stop())
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)

    # ------------------------------------------------------------ engine thread

    def _post(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)  # type: ignore[union-attr]
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        engine = self.engine
        runner = getattr(engine, "runner", None)
        if runner is not None:  # a step thread computes on the engine's device (cuda:N)
            from moska.engine.engine_factory import bind_cuda_device

            bind_cuda_device(getattr(runner, "device", "cpu"))
        while True:
            busy = engine.has_unfinished_requests()
            try:
                first = self._commands.get(block=not busy, timeout=self._idle_wait_s)
                commands = [first]
            except queue.Empty:
                commands = []
            self._iter_start = time.perf_counter()
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            stop = False
            for cmd in commands:
                if isinstance(cmd, Stop):
                    stop = True
                else:
                    self._handle(cmd)
            if stop:
                self._abort_all(EngineDeadError("the server shut down"))
                return
            if commands:
                self._publish_stats()
            if engine.has_unfinished_requests():
                self._step()

    def _handle(self, cmd: Any) -> None:
        engine = self.engine
        if isinstance(cmd, Add):
            with self._lock:
                for _ in cmd.streams:
                    self._pending.popleft()
            if cmd.future.cancelled():
                return
            added: list[str] = []
            load_tokens = _library_to_load(engine, cmd.library, cmd.streams[0].cost)
            t_add = time.perf_counter()
            try:
                for stream, params in zip(cmd.streams, cmd.params):
                    self._streams[stream.request_id] = stream
                    engine.add_request(
                        stream.request_id,
                        cmd.prompt,
                        params,
                        library=cmd.library,
                        top_k_chunks=cmd.top_k_chunks,
                        report_routing=cmd.report_routing,
                    )
                    added.append(stream.request_id)
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                for stream in cmd.streams:
                    self._streams.pop(stream.request_id, None)
                for rid in added:
                    self._engine_abort(rid)
                self._post(set_exception, cmd.future, exc)
                return
            self._num_in_flight += len(cmd.streams)
            self._added += len(cmd.streams)
            if load_tokens:  # this add loaded its library: time it, keep it out of step times
                self._oneoff_end = time.perf_counter()
                self.admission.observe_library_load(load_tokens, self._oneoff_end - t_add)
                self._iter_warmup = True
            self._post(set_result, cmd.future, None)
        elif isinstance(cmd, Abort):
            for rid in cmd.request_ids:
                if self._streams.pop(rid, None) is not None:
                    self._num_in_flight -= 1
                    self._engine_abort(rid)
                    self.metrics.requests.labels("abort").inc()
        elif isinstance(cmd, Call):
            if cmd.future.cancelled():
                return
            try:
                result = cmd.fn()
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                self._post(set_exception, cmd.future, exc)
            else:
                self._post(set_result, cmd.future, result)

    def _engine_abort(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:
            logger.debug("abort_request(%s) raised", request_id, exc_info=True)

    def _step(self) -> None:
        t0 = time.perf_counter()
        with self._lock:  # admission charges only what is left of this step (cleared below)
            # from the end of a library load handed over in this iteration, if one was: the
            # load is a one-off the replay charges apart (`library_load_tokens`), and read as
            # the step running past its ~5 ms prediction (a GPU engine: ~0.12 s to load the
            # demo library) it scaled every new request's replay by it (`predict`'s overdue)
            self._busy_since = max(self._iter_start, self._oneoff_end)
        try:
            outputs = self.engine.step()
        except StepFailedError as exc:  # the engine ended that step's requests, nothing else
            self.failed_steps += 1
            self.metrics.step_failures.inc()
            self._fail(exc.request_ids, EngineStepError(str(exc)))
            return
        except Exception as exc:  # the engine could not contain it: fail everything in flight
            self.failed_steps += 1
            self.metrics.step_failures.inc()
            logger.exception("engine.step() failed; failing %d requests", len(self._streams))
            self._abort_all(EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}"))
            return
        duration = time.perf_counter() - t0
        now = time.monotonic()
        m = self.metrics
        m.step_seconds.observe(duration)
        tally = tally_outputs(outputs, self._streams, m, self.admission, now)
        self._num_in_flight -= tally.finished
        m.add_generated(tally.new_tokens, now)
        # What the admission learns from is the whole loop iteration (handing requests over
        # included), not the step alone: that is what the queue waits for.
        stats = self._publish_stats()
        computed = getattr(stats, "prompt_tokens_computed", None)
        prefill_tokens = tally.prefill_tokens
        if isinstance(computed, int) and self._prompt_computed is not None:
            prefill_tokens = computed - self._prompt_computed  # chunks of unfinished prompts too
        self._prompt_computed = computed if isinstance(computed, int) else None
        # a step that paid a one-off must not raise the step estimate (ONE_OFF_FLAGS)
        warmup = self._iter_warmup or any(getattr(self.engine, a, False) for a in ONE_OFF_FLAGS)
        features = StepFeatures(prefill_tokens, tally.library_pairs, tally.num_decode, self._added)
        self.admission.observe_step(time.perf_counter() - self._iter_start, features, warmup)
        self._added, self._iter_warmup = 0, False
        if tally.deliveries:
            self._post(deliver, tally.deliveries)

    def _fail(self, request_ids: Sequence[str], exc: BaseException) -> None:
        """End these requests' streams with `exc` (the engine has already ended them)."""
        failed = [s for rid in request_ids if (s := self._streams.pop(rid, None)) is not None]
        self._num_in_flight -= len(failed)
        for _ in failed:
            self.metrics.requests.labels("error").inc()
        if failed:
            self._post(deliver, [(s, exc) for s in failed])
        self._publish_stats()

    def _abort_all(self, exc: BaseException) -> None:
        streams = list(self._streams.values())
        self._streams.clear()
        self._num_in_flight = 0
        for stream in streams:
            self._engine_abort(stream.request_id)
        if streams:
            self._post(deliver, [(s, exc) for s in streams])
        self._publish_stats()

    def _publish_stats(self) -> Any:
        """Refresh the admission's view of the queue (from the streams: each one's cost and
        tokens so far) and the gauges; returns engine.stats() (None if it failed)."""
        waiting, running = [], []
        for s in self._streams.values():
            cost = s.cost or RequestCost(s.num_prompt_tokens)
            if s.first_token_time is None:
                waiting.append(cost)
            else:
                running.append((max(0, cost.max_tokens - s.generated), cost.library_attend))
        with self._lock:
            self._snapshot = Load(tuple(waiting), tuple(running))
            self._busy_since = None
            pending = len(self._pending)
        try:
            stats = self.engine.stats()
        except Exception:
            logger.debug("engine.stats() failed", exc_info=True)
            stats = None
        m = self.metrics
        m.queue_length.set(int(getattr(stats, "num_waiting", len(waiting))) + pending)
        m.running.set(int(getattr(stats, "num_running", len(running))))
        kv = getattr(stats, "kv_usage", None)
        if isinstance(kv, int | float):
            m.kv_usage.set(float(kv))
        return stats


def _library_to_load(
    engine: Any, library: str | Sequence[str] | None, cost: RequestCost | None
) -> int:
    """Tokens of `library` (a name, or a composition's names) that adding a request will
    load (0 if every part is loaded)."""
    if library is None or cost is None or not cost.library_load_tokens:
        return 0
    names = getattr(getattr(engine, "libraries", None), "loaded_names", None)
    wanted = {library} if isinstance(library, str) else set(library)
    return 0 if names is None or wanted <= set(names()) else cost.library_load_tokens
