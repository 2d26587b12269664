"""Memory of checksum failures: a build whose files failed verification stays corrupt.

Checksums are checked when a library is loaded (``loaded.verify_files``): hashing every
file is the only way to see bytes altered in place (same size), and it costs a full read
(gigabytes for a real library). Without a memory, every request naming such a library
hashed it all again before its 409, and the listing kept saying "ok". So the first failure
is recorded per build id, with the size and mtime of the manifest and of every file it lists
as they were when the hash started; until the library is deleted (or rebuilt: a new build
id) or one of those stamps changes (a file restored or replaced), loads fail at once with
the remembered error and ``list``/``info`` show status "corrupt".

The record lives in the manager's memory and, best effort, in the library's folder
(``CHECKSUM_FAILED``), so another process (``moska library ls``, a restarted server)
sees it too; a read-only store keeps it in memory only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from moska.library.errors import ChecksumMismatchError, LibraryError
from moska.library.format import MANIFEST_FILE, Manifest, library_files, read_manifest
from moska.library.info import LibraryInfo, LibraryStatus

logger = logging.getLogger(__name__)

FAILURE_FILE = "CHECKSUM_FAILED"  # in the library's folder: the record, as JSON

Stamp = tuple[tuple[str, int, int], ...]  # (file name, size, mtime_ns) of each file


def build_id_of(manifest: Manifest) -> str:
    """The build id of a saved library, as ``LoadedLibrary.build_id`` gives it (manifests
    written before build ids existed: one derived from their file checksums)."""
    if manifest.build_id:
        return manifest.build_id
    digest = hashlib.sha256(json.dumps(manifest.files, sort_keys=True).encode()).hexdigest()
    return f"sha-{digest[:24]}"


def file_stamp(directory: Path, manifest: Manifest) -> Stamp:
    """Size and mtime of the manifest and of every file it lists (raises if one is
    missing or listed outside the folder: such a library is "damaged" anyway)."""
    paths = [directory / MANIFEST_FILE, *library_files(directory, manifest)]
    return tuple((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in paths)


@dataclass(frozen=True)
class ChecksumFailure:
    """One build's failed verification: which file, why, when, and the stamp of its files
    when the hash began (the record holds while the stamp is unchanged)."""

    name: str
    build_id: str
    file: str
    reason: str
    at: str  # ISO 8601, UTC
    stamp: Stamp

    def error(self) -> ChecksumMismatchError:
        """The error a load raises at once while this record holds."""
        return ChecksumMismatchError(
            self.name,
            self.file,
            f"{self.reason}, found at {self.at} (not hashed again until it is rebuilt or "
            "its files change)",
        )

    def describe(self) -> str:
        """The listing's ``reason`` for status "corrupt"."""
        return (
            f"{self.file}: {self.reason}, found when it was loaded at {self.at}; rebuild it: "
            f"delete it with `moska library rm` (DELETE /v1/libraries/{self.name}) and build "
            "it again"
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ChecksumFailure:
        d = json.loads(text)
        stamp = tuple((str(n), int(s), int(t)) for n, s, t in d["stamp"])
        return cls(d["name"], d["build_id"], d["file"], d["reason"], d["at"], stamp)


class ChecksumFailures:
    """The checksum failures of the libraries under ``root`` (one per build id).
    Thread-safe."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._known: dict[str, ChecksumFailure] = {}  # build id -> its failure
        self._lock = threading.Lock()

    def find(self, name: str) -> ChecksumFailure | None:
        """The failure recorded for the build of ``name`` on disk now, if it still holds
        (same build id, same stamp); None otherwise (no record: no manifest is read)."""
        directory = self.root / name
        with self._lock:
            remembered = any(f.name == name for f in self._known.values())
        if not remembered and not (directory / FAILURE_FILE).is_file():
            return None
        try:
            manifest = read_manifest(directory)
            build_id = build_id_of(manifest)
            with self._lock:
                failure = self._known.get(build_id)
            if failure is None:
                failure = ChecksumFailure.from_json((directory / FAILURE_FILE).read_text())
            if failure.build_id != build_id or failure.stamp != file_stamp(directory, manifest):
                with self._lock:  # another build, or its files changed since: verify again
                    self._known.pop(failure.build_id, None)
                return None
        except (OSError, ValueError, KeyError, TypeError, LibraryError):
            return None  # no readable record, or a damaged library: not ours to report
        with self._lock:
            self._known[build_id] = failure
        return failure

    def mark(self, info: LibraryInfo) -> LibraryInfo:
        """``info`` with status "corrupt" and the failure as its reason when a recorded
        failure holds for that library (a damaged one stays damaged)."""
        if info.status != LibraryStatus.OK:
            return info
        failure = self.find(info.name)
        if failure is None:
            return info
        return dataclasses.replace(info, status=LibraryStatus.CORRUPT, reason=failure.describe())

    @contextmanager
    def watch(self, name: str) -> Iterator[None]:
        """Around a load of ``name``: raises the remembered ChecksumMismatchError at once
        while a failure holds; records a ChecksumMismatchError the load raises, stamped as
        the files were before it (a file changed during the hash makes the record stale);
        drops a stale record file after a load that verified."""
        failure = self.find(name)
        if failure is not None:
            raise failure.error()
        directory = self.root / name
        try:
            manifest = read_manifest(directory)
            build_id, stamp = build_id_of(manifest), file_stamp(directory, manifest)
        except (OSError, LibraryError):
            build_id, stamp = None, ()  # the load itself reports what is wrong
        try:
            yield
        except ChecksumMismatchError as e:
            if build_id is not None:
                self._record(ChecksumFailure(name, build_id, e.file, e.reason, _now(), stamp))
            raise
        with suppress(OSError):  # verified: a stale record (files since restored) goes
            (directory / FAILURE_FILE).unlink(missing_ok=True)

    def forget(self, name: str) -> None:
        """``name`` was deleted: its builds' records go (the folder's file went with it)."""
        with self._lock:
            for build_id in [b for b, f in self._known.items() if f.name == name]:
                del self._known[build_id]

    def _record(self, failure: ChecksumFailure) -> None:
        with self._lock:
            self._known[failure.build_id] = failure
        directory = self.root / failure.name
        tmp = directory / f".{FAILURE_FILE}.{os.getpid()}.{threading.get_ident()}"
        try:
            tmp.write_text(failure.to_json())
            os.replace(tmp, directory / FAILURE_FILE)
        except OSError as e:  # a read-only store: this process remembers it anyway
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
            logger.warning("library %s: cannot record its checksum failure: %s", failure.name, e)
        logger.warning("library %s is corrupt: %s", failure.name, failure.describe())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
