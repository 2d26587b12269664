"""Library builds in a child process (`server/build_process.py`) on the real tiny model: the
same library as a build on a thread, progress, cancel, and a child killed mid-build.

The first test's child is spawned (the server's default); the children of the cancel test
fork from tests/distributed's preloaded forkserver (`use_build_context`): a spawned child
pays ~2.6 s of CPU importing torch, and that test starts three."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moska.engine.sampling_params import SamplingParams
from moska.server.build_process import build_context, use_build_context
from moska.server.build_worker import BuildJob, BuildWorker, JobStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from gloo_ranks import forkserver_context  # the forkserver the distributed tests use

pytestmark = pytest.mark.timeout(120)

TEXT = "The quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A real engine of its own (the workers share its weights), libraries in a fresh root."""
    from moska.engine.llm_engine import LLMEngine

    return LLMEngine.from_model(
        None,
        device="cpu",
        max_model_len=1024,
        num_kv_blocks=256,
        library_root=str(tmp_path_factory.mktemp("libraries")),
    )


@pytest.fixture
def forkserver_builds():
    """Build children fork from the forkserver for one test (its PyTorch kernel references
    are the CPU engine's own: the engine runs the "torch" table)."""
    with use_build_context(forkserver_context):
        yield


def _worker(engine, **kwargs) -> BuildWorker:
    worker = BuildWorker(engine.libraries, in_process=True, **kwargs)
    assert worker.mode == "process"
    return worker


def _wait(job: BuildJob, until: Callable[[BuildJob], bool], timeout: float = 60) -> BuildJob:
    deadline = time.monotonic() + timeout
    while not until(job):
        assert time.monotonic() < deadline, job
        time.sleep(0.01)
    return job


def _done(job: BuildJob) -> bool:
    return job.status.done


def _on_disk(engine, name: str) -> list[str]:
    """Everything of `name` in the store: the library, its tmp dirs, its reservation."""
    return [p.name for p in engine.libraries.root.iterdir() if name in p.name]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_process_build_equals_a_thread_build(engine):
    assert build_context().get_start_method() == "spawn"  # the server's default path
    manager = engine.libraries
    docs = [("a.txt", TEXT * 12), ("b.txt", "Lorem ipsum dolor sit amet. " * 8)]
    in_process, on_thread = _worker(engine), BuildWorker(manager, in_process=False)
    try:
        seen: set[tuple[int, int | None]] = set()
        job = in_process.submit(BuildJob("bp-proc", docs, 256, "prefix"))
        thread_job = on_thread.submit(BuildJob("bp-thread", docs, 256, "prefix"))
        while not job.status.done:  # progress as it goes
            seen.add((job.prefilled_tokens, job.total_tokens))
            time.sleep(0.005)
        assert job.status == JobStatus.SUCCEEDED, job.error
        assert _wait(thread_job, _done).status == JobStatus.SUCCEEDED, thread_job.error
    finally:
        in_process.shutdown()
        on_thread.shutdown()
    total = job.total_tokens
    assert total is not None and total > in_process.prefill_tokens  # more than one piece
    assert job.prefilled_tokens == total and job.info.num_tokens == total
    assert (0, total) in seen or any(t == total for _, t in seen)  # reported while running
    assert job.pid is not None and _gone(job.pid)
    # loaded and registered by the parent when the job ended: requests can read it now
    assert {"bp-proc", "bp-thread"} <= set(manager.loaded_names())
    a, b = manager.get("bp-proc"), manager.get("bp-thread")
    assert a.build_id != b.build_id
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.equal(a.chunk_offsets, b.chunk_offsets)
    assert len(a.k_pools) == len(b.k_pools) > 0
    for ka, kb, va, vb in zip(a.k_pools, b.k_pools, a.v_pools, b.v_pools, strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert a.manifest.chunks == b.manifest.chunks
    engine.add_request("bp-read", "Once", SamplingParams(max_tokens=2), library="bp-proc")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs and outputs[-1].finished


def test_cancel_and_a_killed_child(engine, forkserver_builds):
    """Two builds at once, each in its own child. One child is killed (SIGKILL) mid-build:
    its job fails with a message naming no server path, its name and the store are clean,
    and the job queued behind it runs in its place (over the quota: its child answers with
    the quota error). The other is cancelled: it stops mid-prefill and leaves nothing."""
    worker = _worker(engine, prefill_tokens=32, max_tokens=20_000, max_concurrent=2)
    try:
        cancelled = worker.submit(BuildJob("bp-cancel", [("a", TEXT * 400)], 256, "prefix"))
        doomed = worker.submit(BuildJob("bp-killed", [("a", TEXT * 60)], 256, "prefix"))
        after = worker.submit(BuildJob("bp-after", [("a", TEXT * 500)], 256, "prefix"))
        for job in (cancelled, doomed):
            _wait(job, lambda j: j.prefilled_tokens > 0 or j.status.done)
            assert job.status == JobStatus.RUNNING and job.pid is not None, job
        assert after.status == JobStatus.QUEUED
        os.kill(doomed.pid, signal.SIGKILL)
        _wait(doomed, _done)
        _wait(after, lambda j: j.pid is not None or j.status.done)
        assert cancelled.status == JobStatus.RUNNING  # it took the killed build's place
        # cancelled now, not after `after` ends: its prefill no longer competes with the
        # start of `after`'s child for the cores
        worker.cancel(cancelled.id)
        _wait(cancelled, _done)
        _wait(after, _done)
    finally:
        worker.shutdown()
    assert doomed.status == JobStatus.FAILED, doomed
    assert doomed.error.startswith("BuildProcessDied:") and "SIGKILL" in doomed.error
    assert str(engine.libraries.root) not in doomed.error and "/" not in doomed.error
    assert after.status == JobStatus.FAILED and after.pid is not None, after
    assert after.error.startswith("BuildQuotaError:") and "max_build_tokens" in after.error
    assert after.total_tokens > 20_000 and after.prefilled_tokens == 0
    assert cancelled.status == JobStatus.CANCELLED, cancelled
    assert 0 < cancelled.prefilled_tokens < cancelled.total_tokens
    for job in (cancelled, doomed, after):
        assert _gone(job.pid)
        assert _on_disk(engine, job.name) == [], job.name
        assert job.name not in engine.libraries.loaded_names()
        engine.libraries.reserve(job.name).release()  # the name is free again
