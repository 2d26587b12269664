"""A torchrun rank that dies mid-decode (#18 item 1): rank 0 did not spawn it, yet the error
its engine raises (the server's 503) and rank 0's log name the rank within 10 s. As in
test_torchrun_launch.py, two processes forked from gloo_ranks' forkserver get torchrun's
environment and run the same `LLM(...)` line; the test SIGKILLs rank 1 after three decode
steps. Rank 0 watches a rank on its host by a pidfd ("pidfd": named at once); a rank on
another host only by its heartbeat ("heartbeat": rank 0 is made to see rank 1 as remote),
named STALLED_BEATS heartbeats after the collective failed. The heartbeat rule itself (a
slow rank whose heartbeat resumes is never named): test_rank_stall.py."""

from __future__ import annotations

import logging
import os
import queue
import signal
import time

import pytest
from gloo_ranks import forkserver_context
from torchrun_support import free_port, set_torchrun_env
from tp_support import build_checkpoint

pytestmark = pytest.mark.timeout(60)  # a rank that hangs fails the test

KW = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 32}


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def _torchrun_rank(rank: int, port: int, ckpt: str, watch: str, results, go) -> None:
    """One rank as torchrun starts it; rank 0 decodes until the test has killed rank 1,
    then steps until its engine raises, and reports the error, its delay and its log."""
    set_torchrun_env(rank, 2, port)
    import torch

    from moska.distributed import RankFailedError, rank_monitor
    from moska.engine.llm import LLM
    from moska.engine.sampling_params import SamplingParams

    torch.set_num_threads(1)  # torchrun's OMP_NUM_THREADS=1: ranks share the cores
    if watch == "heartbeat":  # rank 1 as if on another host: no pidfd, heartbeats only
        rank_monitor._open_pidfd = lambda identity: None
    errors = _Errors()
    logging.getLogger("moska").addHandler(errors)
    try:
        try:
            llm = LLM(ckpt, tensor_parallel_size=2, **KW)
        except SystemExit as e:  # not expected: rank 1 is killed
            results.put((rank, "exit", e.code))
            return
        engine = llm.engine
        try:
            params = SamplingParams(max_tokens=400, ignore_eos=True)
            engine.add_request("long", [5, 6, 7], params)
            for _ in range(3):
                engine.step()
            results.put((rank, "decoding", None))
            go.wait(20)
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < 30:  # a step that hangs: the test's timeout
                    engine.step()
                results.put((rank, "no error", None))
            except RankFailedError as e:
                elapsed = time.monotonic() - t0
                results.put((rank, "failed", (e.rank, str(e), elapsed, errors.lines)))
        finally:
            llm.shutdown()
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((rank, "error", repr(e)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_checkpoint(tmp_path_factory.mktemp("trfail") / "ckpt", seed=6))


def _next(results, deadline: float) -> tuple:
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            continue
    raise AssertionError("rank 0 did not report in time")


@pytest.mark.parametrize("watch", ["pidfd", "heartbeat"])
def test_killed_torchrun_rank_is_named_within_10_s(ckpt, watch):
    from moska.distributed.rank_monitor import HEARTBEAT_S, STALLED_BEATS

    ctx = forkserver_context()
    results, go = ctx.Queue(), ctx.Event()
    port = free_port()
    procs = [
        ctx.Process(target=_torchrun_rank, args=(r, port, ckpt, watch, results, go)) for r in (0, 1)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 50
        assert _next(results, deadline) == (0, "decoding", None)
        os.kill(procs[1].pid, signal.SIGKILL)  # mid-decode
        killed = time.monotonic()
        go.set()
        rank, kind, value = _next(results, deadline)
        waited = time.monotonic() - killed
        procs[0].join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    assert (rank, kind) == (0, "failed"), (rank, kind, value)
    named, message, elapsed, log = value
    assert named == 1 and "distributed rank 1 failed" in message, message
    assert waited < 10 and elapsed < 10
    if watch == "pidfd":  # seen at once, not after a heartbeat window
        assert "its process exited" in message and elapsed < STALLED_BEATS * HEARTBEAT_S
    else:
        assert "no heartbeat" in message and elapsed >= STALLED_BEATS * HEARTBEAT_S
    assert any("distributed rank 1 failed" in line for line in log), log  # rank 0's log
    assert procs[0].exitcode == 0
