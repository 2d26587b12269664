"""Atomic save of a library to ``<root>/<name>/`` and removal of stale build directories."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Self

import torch

from moska.library.errors import LibraryBusyError, LibraryExistsError
from moska.library.format import (
    BUILDING_FILE,
    MANIFEST_FILE,
    TMP_MARKER,
    Manifest,
    fsync_dir,
    is_tmp_dir,
    layer_file,
    tmp_dir_name,
    validate_name,
    write_durable,
)
from moska.library.loaded import INDEX_PREFIX, TOKENS_FILE

if TYPE_CHECKING:
    from moska.library.loaded import LoadedLibrary

logger = logging.getLogger(__name__)

DELETE_MARKER = f"{TMP_MARKER}del-"
LOCK_TOKEN = "lock"  # a build's name reservation: .<name>.tmp-lock (see BuildLock)
STALE_UNOWNED_S = 3600.0  # tmp dir without a live owner we can check: stale after an hour
STALE_FOREIGN_S = 86400.0  # tmp dir owned by another host: stale after a day


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: _cpu(v) for k, v in tensors.items()}, metadata=metadata)


def _write(directory: Path, fname: str, data: bytes, files: dict[str, str]) -> None:
    write_durable(directory / fname, data)
    files[fname] = hashlib.sha256(data).hexdigest()


def save_library(
    library: LoadedLibrary, root: str | os.PathLike, progress: bool = True
) -> Manifest:
    """Write ``library`` to ``<root>/<name>/`` atomically; return the manifest written
    (with file checksums). Raises LibraryExistsError if the name is taken. On any error
    the temporary directory is removed and nothing appears under the library's name."""
    from tqdm.auto import tqdm

    root = Path(root)
    name = validate_name(library.name)
    final = root / name
    if final.exists():
        raise LibraryExistsError(name, root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / tmp_dir_name(name, uuid.uuid4().hex)
    tmp.mkdir()
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        (tmp / BUILDING_FILE).write_text(json.dumps(owner))
        files: dict[str, str] = {}
        _write(
            tmp,
            TOKENS_FILE,
            _serialize({"token_ids": library.token_ids.to(torch.int32)}, {"name": name}),
            files,
        )
        for i in tqdm(
            range(library.num_kv_layers),
            desc=f"save {name}",
            unit="layer",
            disable=not progress,
            dynamic_ncols=True,
        ):
            tensors = {"k": library.k_pools[i], "v": library.v_pools[i]}
            scales = library.kv_scales(i)
            if scales is not None:  # an FP8 library's per-(token, head) scales
                tensors["k_scale"], tensors["v_scale"] = scales
            for field, value in library.routing[i]._asdict().items():
                if field != "chunk_offsets":
                    assert isinstance(value, torch.Tensor), (field, type(value))
                    tensors[INDEX_PREFIX + field] = value
            _write(tmp, layer_file(i), _serialize(tensors, {"layer": str(i)}), files)
        manifest = dataclasses.replace(library.manifest, files=files)
        write_durable(tmp / MANIFEST_FILE, manifest.to_json().encode())
        fsync_dir(tmp)
        if final.exists():
            raise LibraryExistsError(name, root)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (final / BUILDING_FILE).unlink(missing_ok=True)
    fsync_dir(root)
    return manifest


def _owner_alive(tmp: Path, now: float) -> bool:
    """Whether the build that owns ``tmp`` may still be running."""
    if DELETE_MARKER in tmp.name:
        return False
    try:
        owner = json.loads((tmp / BUILDING_FILE).read_text())
        pid, host, started = int(owner["pid"]), str(owner["host"]), float(owner["started"])
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return now - tmp.stat().st_mtime < STALE_UNOWNED_S
        except OSError:
            return False
    if host != socket.gethostname():
        return now - started < STALE_FOREIGN_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp_dirs(root: str | os.PathLike) -> list[Path]:
    """Remove the tmp directories of builds (and deletions) that can no longer finish."""
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for p in sorted(root.iterdir()):
        if p.is_dir() and is_tmp_dir(p.name) and not _owner_alive(p, now):
            shutil.rmtree(p, ignore_errors=True)
            logger.info("removed stale library build directory %s", p)
            removed.append(p)
    return removed


class BuildLock:
    """A name reserved for one build, across processes: the folder ``<root>/.<name>.tmp-lock``
    made with ``mkdir`` (atomic, fails if it exists) holding the owner's ``BUILDING`` file.
    A lock whose owner died is stale and removed like an interrupted build's directory.
    ``release()`` is idempotent."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.path = root / tmp_dir_name(name, LOCK_TOKEN)
        self._held = False

    def acquire(self) -> BuildLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                self.path.mkdir()
            except FileExistsError:
                if _owner_alive(self.path, time.time()):
                    raise LibraryBusyError(self.name) from None
                shutil.rmtree(self.path, ignore_errors=True)  # its build died: take it over
                continue
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            (self.path / BUILDING_FILE).write_text(json.dumps(owner))
            self._held = True
            return self
        raise LibraryBusyError(self.name)

    def release(self) -> None:
        if self._held:
            self._held = False
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_build(root: str | os.PathLike, name: str) -> BuildLock:
    """Reserve ``name`` for a build under ``root``: LibraryBusyError if a live build (of
    this process or another) holds it."""
    return BuildLock(Path(root), validate_name(name)).acquire()


def delete_library_dir(root: str | os.PathLike, name: str) -> None:
    """Rename ``<root>/<name>`` out of sight first (atomic), then remove it."""
    root = Path(root)
    trash = root / f".{validate_name(name)}{DELETE_MARKER}{uuid.uuid4().hex}"
    os.rename(root / name, trash)
    fsync_dir(root)
    shutil.rmtree(trash, ignore_errors=True)
