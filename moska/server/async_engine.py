"""The engine loop in one background thread, bridged to asyncio.

One thread owns the engine: it alone calls `add_request`, `abort_request`, `step` and any
function submitted with `call` (library builds run there, between steps). The event loop
talks to it through a thread-safe command queue; outputs go back to per-request asyncio
queues with `loop.call_soon_threadsafe`, one call per step.

Guarantees: a request accepted by the engine is stepped until it finishes or its client
aborts it (no output is dropped); an abort frees the request's KV in the engine; shutdown
drains in-flight requests (bounded), then aborts what is left and joins the thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from moska.engine.outputs import RequestOutput
from moska.engine.sampling_params import SamplingParams
from moska.server.admission import AdmissionController, Load
from moska.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop is not running (shut down, or not started)."""


class EngineStepError(RuntimeError):
    """engine.step() raised; every request in flight at that moment fails with this."""


@dataclass
class RequestStream:
    """Outputs of one engine request, consumed on the event loop. Items are
    RequestOutput or an exception; the last RequestOutput has `finished=True`."""

    request_id: str
    num_prompt_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None  # set by the engine thread
    last_token_time: float | None = None
    finished: bool = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if item.finished:
                self.finished = True
            yield item


@dataclass
class _Add:
    streams: list[RequestStream]
    prompt: str | list[int]
    params: list[SamplingParams]
    library: str | None
    top_k_chunks: int | None
    report_routing: bool
    future: asyncio.Future


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: asyncio.Future


class _Stop:
    pass


class AsyncEngine:
    """Owns the engine thread. Create, `start(loop)`, then use from that loop."""

    def __init__(
        self,
        engine: Any,
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
        self._pending_requests = 0  # submitted, not yet handed to the engine
        self._pending_tokens = 0
        self._snapshot = Load(0, 0, 0)
        self._num_in_flight = 0  # accepted and unfinished, engine thread writes
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
            s = self._snapshot
            return Load(
                s.num_waiting + self._pending_requests,
                s.num_running,
                s.waiting_prefill_tokens + self._pending_tokens,
            )

    async def add_requests(
        self,
        request_ids: Sequence[str],
        prompt: str | list[int],
        params: Sequence[SamplingParams],
        num_prompt_tokens: int,
        *,
        library: str | None = None,
        top_k_chunks: int | None = None,
        report_routing: bool = False,
        queue: asyncio.Queue | None = None,
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
        with self._lock:
            self._pending_requests += len(streams)
            self._pending_tokens += num_prompt_tokens * len(streams)
        self._commands.put(
            _Add(streams, prompt, list(params), library, top_k_chunks, report_routing, future)
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
            self._commands.put(_Abort(list(request_ids)))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the engine thread between steps and return its result."""
        if not self.alive:
            raise EngineDeadError("the engine loop is not running")
        assert self._loop is not None
        future = self._loop.create_future()
        self._commands.put(_Call(fn, future))
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
        self._commands.put(_Stop())
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)

    # ------------------------------------------------------------ engine thread

    def _post(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)  # type: ignore[union-attr]
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        engine = self.engine
        while True:
            busy = engine.has_unfinished_requests()
            try:
                first = self._commands.get(block=not busy, timeout=self._idle_wait_s)
                commands = [first]
            except queue.Empty:
                commands = []
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            stop = False
            for cmd in commands:
                if isinstance(cmd, _Stop):
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
        if isinstance(cmd, _Add):
            with self._lock:
                self._pending_requests -= len(cmd.streams)
                self._pending_tokens -= cmd.streams[0].num_prompt_tokens * len(cmd.streams)
            if cmd.future.cancelled():
                return
            added: list[str] = []
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
                self._post(_set_exception, cmd.future, exc)
                return
            self._num_in_flight += len(cmd.streams)
            self._post(_set_result, cmd.future, None)
        elif isinstance(cmd, _Abort):
            for rid in cmd.request_ids:
                if self._streams.pop(rid, None) is not None:
                    self._num_in_flight -= 1
                    self._engine_abort(rid)
                    self.metrics.requests.labels("abort").inc()
        elif isinstance(cmd, _Call):
            if cmd.future.cancelled():
                return
            try:
                result = cmd.fn()
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                self._post(_set_exception, cmd.future, exc)
            else:
                self._post(_set_result, cmd.future, result)

    def _engine_abort(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:
            logger.debug("abort_request(%s) raised", request_id, exc_info=True)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.exception("engine.step() failed; failing %d requests", len(self._streams))
            self._abort_all(EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}"))
            return
        duration = time.perf_counter() - t0
        now = time.monotonic()
        m = self.metrics
        m.step_seconds.observe(duration)
        deliveries: list[tuple[RequestStream, RequestOutput]] = []
        prefill_tokens = num_decode = new_tokens = 0
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted meanwhile
                continue
            n_new = len(out.new_token_ids)
            new_tokens += n_new
            if n_new:
                if stream.first_token_time is None:
                    stream.first_token_time = now
                    prefill_tokens += stream.num_prompt_tokens
                    m.ttft.observe(now - stream.arrival)
                else:
                    num_decode += 1
                    assert stream.last_token_time is not None
                    gap = (now - stream.last_token_time) / n_new
                    for _ in range(n_new):
                        m.itl.observe(gap)
                stream.last_token_time = now
            if out.routed_chunks:
                m.chunks_routed.inc(len(out.routed_chunks))
            if out.finished:
                del self._streams[out.request_id]
                self._num_in_flight -= 1
                reason = out.outputs[0].finish_reason if out.outputs else None
                m.requests.labels(reason or "unknown").inc()
                m.e2e.observe(now - stream.arrival)
            deliveries.append((stream, out))
        m.add_generated(new_tokens, now)
        # a step that captured a CUDA graph is a one-off: it must not raise the step estimate
        warmup = bool(getattr(self.engine, "last_step_captured_graph", False))
        self.admission.observe_step(duration, prefill_tokens, num_decode, warmup)
        self._publish_stats()
        if deliveries:
            self._post(_deliver, deliveries)

    def _abort_all(self, exc: BaseException) -> None:
        streams = list(self._streams.values())
        self._streams.clear()
        self._num_in_flight = 0
        for stream in streams:
            self._engine_abort(stream.request_id)
        if streams:
            self._post(_deliver, [(s, exc) for s in streams])
        self._publish_stats()

    def _publish_stats(self) -> None:
        try:
            stats = self.engine.stats()
            snap = Load(
                int(getattr(stats, "num_waiting", 0)),
                int(getattr(stats, "num_running", 0)),
                int(getattr(stats, "waiting_prefill_tokens", 0)),
            )
        except Exception:
            logger.debug("engine.stats() failed", exc_info=True)
            return
        with self._lock:
            self._snapshot = snap
            pending = self._pending_requests
        self.metrics.queue_length.set(snap.num_waiting + pending)
        self.metrics.running.set(snap.num_running)


def _deliver(items: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
