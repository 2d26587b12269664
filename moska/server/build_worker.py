"""Library builds over HTTP, off the engine thread: queued jobs, a quota, cancel.

A build prefills its documents with the model's own forward (`library/builder.py`), with
its own attention callable and KV pools: it never touches the engine's KV cache or its
scheduler, so it need not run between engine steps. Running it on the engine thread froze
every stream for the whole prefill. Here each build runs, under one of the worker's
`max_concurrent` threads, either

- on the thread itself (the default, and the only way for managers that cannot build in a
  process, such as the tests' fake). On CPU torch releases the GIL inside its ops, so the
  engine thread keeps stepping; on the H200 a 4,000-token build took 0.17 s beside a
  stream that went on at 198 tok/s (334 without; longest gap 25 ms,
  `bench/results/build_during_decode_cuda.json`);
- or in a child process (`server/build_process.py`, `in_process=True`): the child shares
  the engine's weights (no copy), builds and saves the library, and the thread only relays
  its progress and loads the result. Its own interpreter never holds the engine thread's
  GIL, but starting it (importing torch, a CUDA context) costs seconds: on the H200 the
  same build took 13.8 s and the stream stalled for 12.5 s of it (8.8 tok/s), so it is
  not the default anywhere.

Either way the build runs at a lower priority (Linux niceness), on CUDA on a stream of its
own, and prefills in pieces of `CPU_PREFILL_TOKENS` on CPU, so that the decode steps keep
most of the cores (a 4,096-token piece is one attention op of many seconds on CPU, and
decode steps stalled behind it for seconds).

Quota: at most `max_concurrent` builds run at once and `max_queued` wait; a build of more
than `max_tokens` tokens fails before its prefill. A cancelled job that is queued never
starts; a running one stops at the next prefill piece (`prefill_corpus`'s hook; a child
process that does not stop within `cancel_grace_s` is killed) and leaves nothing on disk.
A finished build is registered with the engine's `LibraryManager` (thread-safe), so new
requests can read it.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from moska.library.errors import LibraryError
from moska.server.build_process import (  # the errors are re-exported
    BUILD_NICENESS,
    CANCEL_GRACE_S,
    BuildCancelledError,
    BuildProcessError,
    BuildQuotaError,
    BuildSpec,
    SharedModel,
    build_stream,
    progress_hook,
    run_build_process,
    supports_process_builds,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_BUILD_TOKENS = 1 << 20
DEFAULT_MAX_CONCURRENT_BUILDS = 1
DEFAULT_MAX_QUEUED_BUILDS = 16
CPU_PREFILL_TOKENS = 512  # tokens per prefill forward of a build on CPU
# The default of `in_process` on CPU: no. On CPU torch releases the GIL inside its ops, so a
# build thread does not starve the engine thread, and a process pays a torch import per
# build. Measured (bench/build_during_decode.py, tiny model, 2 busy cores): a 2,000-token
# build took 8 s on a thread (decode 55 -> 18 tok/s) and 107 s in a niced process (decode
# 30 -> 15 tok/s); 4,000 tokens: 28 s (24 -> 19 tok/s) against 123 s (56 -> 12 tok/s).
CPU_BUILDS_IN_PROCESS = False
# On CUDA: no either (the H200 figures in the module docstring).
CUDA_BUILDS_IN_PROCESS = False
_MAX_FINISHED_JOBS = 1000  # finished jobs beyond this are forgotten, oldest first


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class BuildQueueFullError(RuntimeError):
    """More builds waiting than the server queues (answered with 429)."""


@dataclass
class BuildJob:
    """One build request. The worker thread writes its fields; readers see a consistent
    enough snapshot (each field is one atomic assignment)."""

    name: str
    documents: Sequence[tuple[str, str]] | None
    chunk_size: int | None
    mode: str
    kv_dtype: str = "auto"
    routing_rank: int | None = None  # None: the builder's default (head_dim / 4)
    boundary_repair: tuple[int, int] | None = None  # (tokens, layers); None: no repair
    reservation: Any = None  # the manager's name reservation, released when the job ends
    id: str = field(default_factory=lambda: f"libjob-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    status: JobStatus = JobStatus.QUEUED
    prefilled_tokens: int = 0
    total_tokens: int | None = None  # known once the documents are tokenized
    finished: int | None = None
    error: str | None = None
    info: Any = None  # the LibraryInfo of a succeeded build
    pid: int | None = None  # the build's process, when it runs in one
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)


class BuildWorker:
    """Runs queued builds on `max_concurrent` threads of its own, each in a child process
    (`in_process`) or on the thread (`manager.build`)."""

    def __init__(
        self,
        manager: Any,
        *,
        max_tokens: int = DEFAULT_MAX_BUILD_TOKENS,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT_BUILDS,
        max_queued: int = DEFAULT_MAX_QUEUED_BUILDS,
        prefill_tokens: int | None = None,
        in_process: bool | None = None,
        cancel_grace_s: float = CANCEL_GRACE_S,
    ) -> None:
        """`prefill_tokens`: tokens per prefill forward (None: the builder's default on
        CUDA, `CPU_PREFILL_TOKENS` on CPU); a cancel takes effect between two of them.
        `in_process`: build in a child process (None: on CUDA, and on CPU when
        `CPU_BUILDS_IN_PROCESS`); a manager that cannot (`supports_process_builds`) builds
        on the thread. Make the worker before the engine steps: it shares the weights."""
        self.manager = manager
        self.max_tokens = max_tokens
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        on_cuda = _device_type(manager) == "cuda"
        if prefill_tokens is None and not on_cuda:
            prefill_tokens = CPU_PREFILL_TOKENS
        self.prefill_tokens = prefill_tokens
        self.cancel_grace_s = cancel_grace_s
        if in_process is None:
            in_process = CUDA_BUILDS_IN_PROCESS if on_cuda else CPU_BUILDS_IN_PROCESS
        self._shared: SharedModel | None = None
        if in_process and supports_process_builds(manager):
            try:
                self._shared = SharedModel.of(manager.loaded_model)
            except (OSError, RuntimeError):  # e.g. /dev/shm too small for the weights
                logger.warning("cannot share the weights; builds run on threads", exc_info=True)
        elif in_process:
            logger.info("this engine's library manager builds on threads only")
        self.jobs: dict[str, BuildJob] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(
            max_concurrent, thread_name_prefix="moska-build", initializer=_lower_priority
        )
        self._closed = False

    @property
    def mode(self) -> str:
        """Where builds run: "process" or "thread"."""
        return "process" if self._shared is not None else "thread"

    # ------------------------------------------------------------ event-loop side

    def submit(self, job: BuildJob) -> BuildJob:
        """Queue `job`; BuildQueueFullError when `max_queued` jobs already wait."""
        with self._lock:
            if self._closed:
                raise BuildQueueFullError("the server is shutting down")
            waiting = sum(j.status == JobStatus.QUEUED for j in self.jobs.values())
            if waiting >= self.max_queued:
                raise BuildQueueFullError(
                    f"{waiting} library builds are already queued (max_queued_builds): retry "
                    "when one has finished"
                )
            self.jobs[job.id] = job
            self._forget_old_jobs()
        self._executor.submit(self._run, job)
        return job

    def get(self, job_id: str) -> BuildJob | None:
        return self.jobs.get(job_id)

    def cancel(self, job_id: str) -> BuildJob | None:
        """Cancel a job: a queued one is cancelled at once (its name is free again), a
        running one stops at its next prefill piece. A finished job is left as it is."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        with self._lock:
            if job.status.done:
                return job
            job.cancel_requested.set()
            if job.status == JobStatus.QUEUED:
                self._finish(job, JobStatus.CANCELLED)
        return job

    def shutdown(self, wait: bool = True) -> None:
        """Cancel every job (running ones stop at their next piece) and join the threads."""
        with self._lock:
            self._closed = True
            jobs = list(self.jobs.values())
        for job in jobs:
            self.cancel(job.id)
        self._executor.shutdown(wait=wait, cancel_futures=True)

    # ------------------------------------------------------------ worker threads

    def _run(self, job: BuildJob) -> None:
        with self._lock:
            if job.status != JobStatus.QUEUED:  # cancelled while queued
                return
            job.status = JobStatus.RUNNING
        try:
            if self._shared is not None:
                info = self._build_in_process(job, self._shared)
            else:
                info = self._build_in_thread(job)
        except BuildCancelledError:
            with self._lock:
                self._finish(job, JobStatus.CANCELLED)
        except Exception as exc:  # reported through the job
            kind = exc.kind if isinstance(exc, BuildProcessError) else type(exc).__name__
            if not isinstance(exc, LibraryError | BuildProcessError):
                logger.exception("library build %s (%s) failed", job.id, job.name)
            # an OSError's text names server paths: the client gets its reason only
            reason = (exc.strerror or "I/O error") if isinstance(exc, OSError) else str(exc)
            with self._lock:
                job.error = f"{kind}: {reason}"
                self._finish(job, JobStatus.FAILED)
        else:
            with self._lock:
                job.info = info
                self._finish(job, JobStatus.SUCCEEDED)

    def _build_in_thread(self, job: BuildJob) -> Any:
        kwargs: dict[str, Any] = {"on_progress": self._hook(job)}
        if job.kv_dtype != "auto":
            kwargs["kv_dtype"] = job.kv_dtype
        if job.routing_rank is not None:
            kwargs["routing_rank"] = job.routing_rank
        if job.boundary_repair is not None:
            kwargs["boundary_repair"] = job.boundary_repair
        if self.prefill_tokens is not None:
            kwargs["prefill_tokens"] = self.prefill_tokens
        if job.reservation is not None:
            kwargs["reservation"] = job.reservation
            job.reservation = None  # the manager releases it from now on
        with build_stream(getattr(self.manager, "device", None)):
            return self.manager.build(job.name, job.documents, job.chunk_size, job.mode, **kwargs)

    def _build_in_process(self, job: BuildJob, shared: SharedModel) -> Any:
        """Build in a child process; this thread holds the name meanwhile, then loads the
        library into the manager (registered: new requests can read it at once)."""
        reservation = job.reservation or self.manager.reserve(job.name)
        job.reservation = None  # released here, whatever happens to the child
        try:
            spec = BuildSpec(
                name=job.name,
                documents=list(job.documents or ()),
                chunk_size=job.chunk_size,
                mode=job.mode,
                kv_dtype=job.kv_dtype,
                routing_rank=job.routing_rank,
                boundary_repair=job.boundary_repair,
                root=self.manager.root,
                device=str(self.manager.device),
                max_tokens=self.max_tokens,
                prefill_tokens=self.prefill_tokens,
            )
            info = run_build_process(
                shared,
                spec,
                on_progress=self._hook(job),
                cancelled=job.cancel_requested,
                on_start=lambda pid: setattr(job, "pid", pid),
                grace_s=self.cancel_grace_s,
            )
            try:
                self.manager.load_built(job.name)
            except Exception:  # saved all the same: requests load it on first use
                logger.warning("library %s was built but not loaded", job.name, exc_info=True)
            return info
        finally:
            reservation.release()

    def _hook(self, job: BuildJob) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            job.prefilled_tokens, job.total_tokens = done, total

        return progress_hook(self.max_tokens, report, job.cancel_requested.is_set)

    def _finish(self, job: BuildJob, status: JobStatus) -> None:
        """Under `self._lock`: end the job, free what it holds."""
        job.status = status
        job.finished = int(time.time())
        job.documents = None  # the texts can be large
        if job.reservation is not None:
            job.reservation.release()
            job.reservation = None

    def _forget_old_jobs(self) -> None:
        done = [k for k, j in self.jobs.items() if j.status.done]
        for key in done[: max(0, len(self.jobs) - _MAX_FINISHED_JOBS)]:
            del self.jobs[key]


def _device_type(manager: Any) -> str:
    device = getattr(manager, "device", None)
    return str(getattr(device, "type", device or "cpu"))


def _lower_priority() -> None:
    """Run this thread at a lower priority than the engine's: Linux schedules each thread
    by its own niceness (elsewhere this does nothing)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BUILD_NICENESS)
    except (AttributeError, OSError):
        logger.debug("could not lower the build thread's priority", exc_info=True)


__all__ = [
    "BuildCancelledError",
    "BuildJob",
    "BuildQueueFullError",
    "BuildQuotaError",
    "BuildWorker",
    "JobStatus",
]
