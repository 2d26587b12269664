"""Durable files of a library folder: write-and-fsync, directory fsync, streamed sha256,
folder size. Plain Python."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on directories
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path, on_bytes: Any = None, block: int = 1 << 24) -> str:
    """sha256 hex of a file, streaming; ``on_bytes(n)`` is called as blocks are read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
            if on_bytes is not None:
                on_bytes(len(data))
    return h.hexdigest()


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
