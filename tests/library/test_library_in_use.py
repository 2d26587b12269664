"""A library in use is never deleted from under its readers: requests hold the build they
acquired; another process (a running server) holds a shared lock on what it loaded."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from moska.library.errors import LibraryDeletingError, LibraryInUseError, LibraryNotFoundError
from moska.library.manager import LibraryManager

DOCS = [("a.txt", "The cat sat on the mat. " * 3), ("b.txt", "Dogs bark at night. " * 3)]


@pytest.fixture
def manager(tiny_model, tmp_path):
    mgr = LibraryManager(tmp_path, tiny_model, progress=False)
    mgr.build("held", DOCS, chunk_size=32)
    return mgr


def test_delete_refuses_while_a_request_holds_it(manager):
    lib = manager.acquire("held")
    assert manager.num_users("held") == 1
    with pytest.raises(LibraryInUseError, match="1 running request"):
        manager.delete("held")
    assert manager.get("held") is lib  # a refused delete changes nothing
    manager.release(lib)
    manager.delete("held")
    with pytest.raises(LibraryNotFoundError):
        manager.get("held")


def test_each_build_has_its_own_id(manager):
    first = manager.get("held").build_id
    manager.delete("held")
    manager.build("held", DOCS, chunk_size=32)
    assert manager.get("held").build_id != first


def test_delete_with_wait_refuses_new_readers_then_deletes(manager):
    lib = manager.acquire("held")
    errors: list[BaseException] = []

    def delete() -> None:
        try:
            manager.delete("held", wait_s=30)
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)

    waiter = threading.Thread(target=delete)
    waiter.start()
    deadline = time.monotonic() + 10
    while True:  # the waiting delete refuses new readers
        try:
            manager.release(manager.acquire("held"))
        except LibraryDeletingError:
            break
        assert time.monotonic() < deadline, "the delete never started waiting"
        time.sleep(0.001)
    assert waiter.is_alive()
    manager.release(lib)  # the last reader ends: the delete goes through
    waiter.join(10)
    assert not waiter.is_alive() and errors == []
    assert not manager.exists("held")


def _rm(root) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moska.cli", "library", "rm", "held", "--library-root", str(root)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)


def test_rm_from_another_process_refuses_while_loaded(manager, tmp_path):
    manager.get("held")  # loaded here, as a server would: a shared lock on its manifest
    r = _rm(tmp_path)
    assert r.returncode == 2 and "loaded by another moska process" in r.stderr
    assert str(tmp_path) not in r.stderr  # names the library, not the server's path
    assert manager.exists("held")
    manager.unload("held")
    # once unloaded the same command goes through; in this process (no lock held here now):
    # a second subprocess would only pay for Python's and torch's imports again
    from moska.cli import main

    assert main(["library", "rm", "held", "--library-root", str(tmp_path)]) == 0
    assert not manager.exists("held")
