"""Build reservations: one build per name at a time (threads, managers, processes), the
name freed after a failure or a cancel, and a dead owner's reservation taken over."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from moska.library import (
    LibraryBusyError,
    LibraryExistsError,
    LibraryManager,
)
from moska.library import builder as builder_module
from moska.library.format import tmp_dir_name
from moska.library.store import LOCK_TOKEN

DOCS = [
    ("a.md", "# Alpha\nThe quick brown fox jumps over the lazy dog. " * 3),
    ("b.txt", "Bravo: pack my box with five dozen liquor jugs."),
    ("c.md", "Charlie " * 20),
]


def test_second_build_of_a_name_fails_before_its_prefill(tiny_model, tmp_path, monkeypatch):
    mgr = LibraryManager(tmp_path, tiny_model, progress=False)
    prefills = []
    real = builder_module.build_in_memory
    monkeypatch.setattr(
        builder_module, "build_in_memory", lambda *a, **k: prefills.append(a[2]) or real(*a, **k)
    )
    held = mgr.reserve("x")
    with pytest.raises(LibraryBusyError, match="being built"):
        mgr.build("x", DOCS, chunk_size=32)
    with pytest.raises(LibraryBusyError):
        LibraryManager(tmp_path, tiny_model).reserve("x")  # another manager, same store
    assert prefills == [] and [i.name for i in mgr.list()] == []  # hidden while building
    info = mgr.build("x", DOCS, chunk_size=32, reservation=held)
    assert info.status == "ok" and prefills == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # lock released
    with pytest.raises(LibraryExistsError):
        mgr.reserve("x")


def test_reservation_is_released_on_failure_and_cancel(tiny_model, tmp_path, monkeypatch):
    mgr = LibraryManager(tmp_path, tiny_model, progress=False)

    def fail(*a, **k):
        raise RuntimeError("prefill failed")

    monkeypatch.setattr(builder_module, "build_in_memory", fail)
    with pytest.raises(RuntimeError):
        mgr.build("y", DOCS)
    mgr.reserve("y").release()  # free again after the failure
    job = mgr.reserve("y")
    job.release()  # a job cancelled before it started gives the name back
    job.release()  # idempotent
    mgr.reserve("y").release()
    assert list(tmp_path.iterdir()) == []


def test_only_one_of_many_threads_reserves_a_name(tmp_path):
    mgr = LibraryManager(tmp_path, None)
    barrier = threading.Barrier(8)
    results: list[object] = []

    def race() -> None:
        barrier.wait()
        try:
            results.append(mgr.reserve("z"))
        except LibraryBusyError as e:
            results.append(e)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if not isinstance(r, LibraryBusyError)]
    assert len(results) == 8 and len(winners) == 1
    winners[0].release()


# What a build in another process leaves while it runs (see store.BuildLock), written
# without importing moska so the child starts in milliseconds.
_HOLDER = """
import json, os, socket, sys, time
os.mkdir(sys.argv[1])
owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
with open(os.path.join(sys.argv[1], "BUILDING"), "w") as f:
    json.dump(owner, f)
print("held", flush=True)
sys.stdin.readline()
"""


def test_reservation_across_processes_and_stale_after_owner_dies(tmp_path):
    lock = tmp_path / tmp_dir_name("w", LOCK_TOKEN)
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        mgr = LibraryManager(tmp_path, None)
        with pytest.raises(LibraryBusyError):
            mgr.reserve("w")
        child.kill()  # dies holding the lock
        child.wait(timeout=30)
        mgr.reserve("w").release()  # the dead owner's lock is stale: taken over
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
