"""Cross-process holds on the libraries of a store: a ``flock`` on each library's manifest.

A process that has a library loaded holds a shared lock on its ``manifest.json``; a delete
takes the exclusive lock without waiting first, so ``moska library rm`` refuses (instead of
pulling the files from under a running server) while any process serves the library.
The locks are advisory and per open file description: closing the descriptor drops them,
and a process that dies drops its own.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from moska.library.errors import CorruptLibraryError, LibraryInUseError, LibraryNotFoundError
from moska.library.format import MANIFEST_FILE
from moska.library.store import delete_library_dir


class ManifestHolds:
    """The shared locks this process holds on the manifests of the libraries under
    ``root`` that it has loaded, by name. Not thread-safe: the manager calls it under its
    own lock."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fds: dict[str, int] = {}  # name -> descriptor holding its shared lock

    def hold(self, name: str) -> None:
        """Take a shared lock on ``name``'s manifest (kept until ``drop(name)``). Best
        effort: a library built in memory only (no manifest), a store without locking, or
        one another process is deleting right now is served without a hold."""
        try:
            fd = os.open(self.root / name / MANIFEST_FILE, os.O_RDONLY)
        except OSError:  # built in memory only, or a store without locking
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # another process is deleting it: serve what we loaded anyway
            os.close(fd)
            return
        self._fds[name] = fd

    def drop(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the shared lock


def delete_unheld(root: Path, name: str) -> None:
    """Remove ``<root>/<name>`` unless another process holds it (LibraryInUseError, nothing
    removed). LibraryNotFoundError if it vanished meanwhile; a failed removal is a
    CorruptLibraryError whose message names no server path."""
    try:
        fd: int | None = os.open(root / name / MANIFEST_FILE, os.O_RDONLY)
    except OSError:
        fd = None  # no manifest (a damaged library): nothing can hold it loaded
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                raise LibraryInUseError(name, None) from e
        delete_library_dir(root, name)
    except FileNotFoundError as e:
        raise LibraryNotFoundError(name, root) from e
    except OSError as e:
        reason = e.strerror or type(e).__name__  # never the server path
        raise CorruptLibraryError(name, name, f"cannot delete ({reason})") from e
    finally:
        if fd is not None:
            os.close(fd)
