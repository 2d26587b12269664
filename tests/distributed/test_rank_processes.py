"""A rank started by rank 0 leaves when rank 0 is gone, under the forkserver the tests use
and under fork (whose child inherits rank 0's end of the pipe and must drop it): it keeps
beating while rank 0's end is open (a forkserver child's parent is the forkserver, so the
old `os.getppid()` check left at once), and exits with code 1 within 2 s once it closes, as
the kernel closes it when rank 0 dies. The seam that picks the start method restores the one
before (the default, for users, is spawn)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from gloo_ranks import forkserver_context

from moska.distributed import rank_processes
from moska.distributed.rank_processes import (
    open_parent_link,
    process_context,
    use_process_context,
)


class _Store:
    def __init__(self, beats) -> None:
        self.beats = beats

    def add(self, _key: str, n: int) -> int:
        with self.beats.get_lock():
            self.beats.value += n
            return self.beats.value

    def set(self, _key: str, _value: str) -> None:
        pass


def _rank(link, beats) -> None:
    """A rank's lifecycle around a serve loop that never ends on its own."""
    from moska.distributed.worker import rank_lifecycle

    groups = SimpleNamespace(rank=1, store=_Store(beats), close=lambda: None)
    with rank_lifecycle(groups, link):  # type: ignore[arg-type]
        threading.Event().wait(60)


def _wait(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("method", ["forkserver", "fork"])
def test_rank_leaves_when_rank_0_is_gone(method):
    import multiprocessing

    ctx = forkserver_context() if method == "forkserver" else multiprocessing.get_context("fork")
    beats = ctx.Value("i", 0)
    end, link = open_parent_link(ctx)
    p = ctx.Process(target=_rank, args=(link, beats), daemon=True)
    try:
        p.start()
        link.reader.close()
        assert _wait(lambda: beats.value >= 2, 10.0), "the rank did not beat"
        assert p.exitcode is None  # rank 0 is there: it stays
        end.close()
        t0 = time.monotonic()
        p.join(5.0)
        assert p.exitcode == 1 and time.monotonic() - t0 < 2.0
    finally:
        end.close()
        if p.is_alive():
            p.kill()
            p.join(5.0)


def test_start_method_seam_restores_the_one_before():
    import multiprocessing

    assert rank_processes._spawn().get_start_method() == "spawn"  # the users' default
    assert process_context().get_start_method() == "forkserver"  # conftest.py's, here
    with use_process_context(lambda: multiprocessing.get_context("spawn")):
        assert process_context().get_start_method() == "spawn"
    assert process_context().get_start_method() == "forkserver"
