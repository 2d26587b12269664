"""Library builds over HTTP, off the engine thread: queued jobs, a quota, cancel.

A build prefills its documents with the model's own forward (`library/builder.py`), with
its own attention callable and KV pools: it never touches the engine's KV cache or its
scheduler, so it need not run between engine steps. Running it on the engine thread froze
every stream for the whole prefill; here it runs on the worker's own threads instead
(`max_concurrent` of them), on CUDA on a stream of its own, so decode steps go on beside
it. On CPU torch releases the GIL inside its ops, so the engine thread keeps stepping; the
build threads run at a lower priority (Linux niceness) and prefill in pieces of
`CPU_PREFILL_TOKENS`, so that the decode steps keep most of the cores (a 4,096-token piece
is one attention op of many seconds on CPU, and decode steps stalled behind it for seconds).

Quota: at most `max_concurrent` builds run at once and `max_queued` wait; a build of more
than `max_tokens` tokens fails before its prefill. A cancelled job that is queued never
starts; a running one stops at the next prefill piece (`prefill_corpus`'s hook) and
leaves nothing on disk (the library is written only after its prefill). A finished build
is registered with the engine's `LibraryManager` (thread-safe), so new requests can read it.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from moska.library.errors import LibraryError

logger = logging.getLogger(__name__)

DEFAULT_MAX_BUILD_TOKENS = 1 << 20
DEFAULT_MAX_CONCURRENT_BUILDS = 1
DEFAULT_MAX_QUEUED_BUILDS = 16
CPU_PREFILL_TOKENS = 512  # tokens per prefill forward of a build on CPU
BUILD_NICENESS = 10  # build threads yield the CPU to the engine thread (Linux)
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


class BuildCancelledError(Exception):
    """Raised from the prefill hook of a build whose job was cancelled."""


class BuildQuotaError(LibraryError):
    """A build larger than the server allows."""

    def __init__(self, num_tokens: int, max_tokens: int) -> None:
        super().__init__(
            f"the documents are {num_tokens} tokens; this server builds libraries of at most "
            f"{max_tokens} tokens over HTTP (max_build_tokens): split them into several "
            "libraries, or build this one offline with `moska library build`"
        )
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


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
    reservation: Any = None  # the manager's name reservation, released when the job ends
    id: str = field(default_factory=lambda: f"libjob-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    status: JobStatus = JobStatus.QUEUED
    prefilled_tokens: int = 0
    total_tokens: int | None = None  # known once the documents are tokenized
    finished: int | None = None
    error: str | None = None
    info: Any = None  # the LibraryInfo of a succeeded build
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)


class BuildWorker:
    """Runs `manager.build` for queued jobs on `max_concurrent` threads of its own."""

    def __init__(
        self,
        manager: Any,
        *,
        max_tokens: int = DEFAULT_MAX_BUILD_TOKENS,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT_BUILDS,
        max_queued: int = DEFAULT_MAX_QUEUED_BUILDS,
        prefill_tokens: int | None = None,
    ) -> None:
        """`prefill_tokens`: tokens per prefill forward (None: the builder's default on
        CUDA, `CPU_PREFILL_TOKENS` on CPU); a cancel takes effect between two of them."""
        self.manager = manager
        self.max_tokens = max_tokens
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        if prefill_tokens is None and _device_type(manager) != "cuda":
            prefill_tokens = CPU_PREFILL_TOKENS
        self.prefill_tokens = prefill_tokens
        self.jobs: dict[str, BuildJob] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(
            max_concurrent, thread_name_prefix="moska-build", initializer=_lower_priority
        )
        self._closed = False

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
            with _own_stream(getattr(self.manager, "device", None)):
                info = self.manager.build(
                    job.name,
                    job.documents,
                    job.chunk_size,
                    job.mode,
                    **self._build_kwargs(job),
                )
        except BuildCancelledError:
            with self._lock:
                self._finish(job, JobStatus.CANCELLED)
        except Exception as exc:  # reported through the job
            if not isinstance(exc, LibraryError):
                logger.exception("library build %s (%s) failed", job.id, job.name)
            with self._lock:
                job.error = f"{type(exc).__name__}: {exc}"
                self._finish(job, JobStatus.FAILED)
        else:
            with self._lock:
                job.info = info
                self._finish(job, JobStatus.SUCCEEDED)

    def _build_kwargs(self, job: BuildJob) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"on_progress": self._hook(job)}
        if self.prefill_tokens is not None:
            kwargs["prefill_tokens"] = self.prefill_tokens
        if job.reservation is not None:
            kwargs["reservation"] = job.reservation
            job.reservation = None  # the manager releases it from now on
        return kwargs

    def _hook(self, job: BuildJob) -> Callable[[int, int], None]:
        def on_progress(done: int, total: int) -> None:
            job.prefilled_tokens, job.total_tokens = done, total
            if total > self.max_tokens:
                raise BuildQuotaError(total, self.max_tokens)
            if job.cancel_requested.is_set():
                raise BuildCancelledError(job.id)

        return on_progress

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


@contextlib.contextmanager
def _own_stream(device: Any) -> Iterator[None]:
    """On CUDA, run the build on a stream of its own so that it overlaps the engine's
    decode steps instead of queueing behind them on one stream."""
    import torch

    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        yield
        return
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()  # the library's tensors are complete before the engine reads them
