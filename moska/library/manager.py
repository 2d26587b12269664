"""LibraryManager: list, inspect, build, delete and load (with caching) the libraries
under one root directory, for one model. Used by the server, the engine and the CLI."""

from __future__ import annotations

import builtins
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moska.library.arena import ArenaFullError, ArenaLayout, ArenaRange, KVArena, library_layout
from moska.library.arena_budget import arena_rows, check_memory
from moska.library.builder import DEFAULT_PREFILL_TOKENS, build_and_save
from moska.library.checksum_failures import ChecksumFailures
from moska.library.errors import (
    LibraryDeletingError,
    LibraryError,
    LibraryExistsError,
    LibraryInUseError,
    LibraryNotFoundError,
)
from moska.library.format import (
    Manifest,
    ModelFingerprint,
    model_fingerprint,
    validate_name,
)
from moska.library.fp8_mma import attach_at_register
from moska.library.info import LibraryInfo
from moska.library.loaded import LoadedLibrary, load_library
from moska.library.manifest_locks import ManifestHolds, delete_unheld
from moska.library.prefill import ProgressHook
from moska.library.store import BuildLock, lock_build, remove_stale_tmp_dirs

logger = logging.getLogger(__name__)


def default_library_root() -> Path:
    """``$MOSKA_HOME/libraries``, else ``~/.cache/moska/libraries``."""
    from moska.paths import moska_home

    return moska_home() / "libraries"


class LibraryManager:
    """Libraries under ``root`` for ``loaded_model`` (a ``LoadedModel``; None for listing
    and deleting only). Thread-safe: the cache of loaded libraries is guarded by a lock.

    - ``list()`` / ``info(name)`` read manifests only; ``compatible`` says whether a library
      was built for this model (None without a model); a damaged one has status "damaged".
    - ``get(name)`` loads on first use (fingerprint and checksums verified) and caches. A
      build that failed its checksums is remembered (``checksum_failures``): listed
      "corrupt", and later loads fail at once without hashing it again.
    - ``reserve(name)`` / ``build(...)``: one build per name at a time (LibraryBusyError
      at once for a second one); writes atomically and keeps the built library loaded.
    - ``delete(name)`` unloads, then removes the directory.
    Stale temporary directories of interrupted builds are removed on construction.

    Resident libraries keep their chunk KV (tiered ones their GPU slots) in one slot space
    (``self.arena``, library/arena.py): a composed request reads them in one grouped launch.
    "auto" sizes it, at the first library it takes, to the library cache's share for KV
    (``memory``'s plan: what is left beside the libraries already loaded, in the first
    library's ratio of KV to routing index; arena_budget.py), and only when
    the engine set a memory plan; a number of bytes sizes it so; None: every
    library keeps pools of its own. A library that does not fit (or is FP8, or of
    another layout) keeps pools of its own.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        loaded_model: Any = None,
        device: str | torch.device = "cpu",
        *,
        progress: bool = True,
        tiers: Any = None,
        arena: str | int | None = "auto",
        fp8_attention: str = "upcast",
    ) -> None:
        self.root = Path(root) if root is not None else default_library_root()
        self.tiers = tiers  # a TierConfig (library/tiers.py): libraries over budget in tiers
        self.loaded_model = loaded_model
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.progress = progress
        self._fingerprint: ModelFingerprint | None = None
        self._loaded: dict[str, LoadedLibrary] = {}
        self._lock = threading.RLock()
        self._released = threading.Condition(self._lock)  # a request released a library
        self._refs: dict[str, int] = {}  # build id -> requests holding it
        self._holds = ManifestHolds(self.root)  # shared flocks on loaded manifests
        self.checksum_failures = ChecksumFailures(self.root)  # corrupt builds, not re-hashed
        self._deleting: set[str] = set()  # names a delete is waiting on
        # the engine's library cache budget (engine/memory.py LibraryMemory); None: unchecked
        self.memory: Any = None
        # extra load_library keywords (a tensor-parallel rank's kv_heads: distributed/)
        self.load_options: dict[str, Any] = {}
        if not (arena in (None, "auto") or (isinstance(arena, int) and arena >= 0)):
            raise ValueError(f"arena must be 'auto', a number of bytes or None, got {arena!r}")
        self._arena_size = arena
        # FP8 libraries: "mma" / "mma_qsplit" read them on FP8 tensor cores (library/fp8_mma.py)
        self.fp8_attention = fp8_attention
        self.arena: KVArena | None = None  # made at the first library it takes
        remove_stale_tmp_dirs(self.root)

    @property
    def fingerprint(self) -> ModelFingerprint | None:
        if self._fingerprint is None and self.loaded_model is not None:
            self._fingerprint = model_fingerprint(self.loaded_model)
        return self._fingerprint

    def _dir(self, name: str) -> Path:
        path = self.root / validate_name(name)
        if not path.is_dir():
            raise LibraryNotFoundError(name, self.root)
        return path

    def list(self) -> list[LibraryInfo]:
        """Every library under the root, by name; a damaged one (manifest or a file missing
        or unreadable) is listed with status "damaged" and its reason, so it can be seen and
        removed. Hidden directories (builds in progress) and folders whose name is not a
        valid library name are never listed."""
        if not self.root.is_dir():
            return []
        infos = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or not p.is_dir():
                continue
            try:
                validate_name(p.name)
            except LibraryError as e:
                logger.warning("skipping %s: %s", p, e)
                continue
            infos.append(self.checksum_failures.mark(LibraryInfo.from_dir(p, self.fingerprint)))
        return infos

    def info(self, name: str) -> LibraryInfo:
        """What ``list()`` says of ``name`` (status "damaged" rather than an error when its
        manifest or files are); LibraryNotFoundError if there is no such library."""
        info = LibraryInfo.from_dir(self._dir(name), self.fingerprint)
        return self.checksum_failures.mark(info)

    def reserve(self, name: str) -> BuildLock:
        """Reserve ``name`` for a build starting now, before any prefill is spent:
        LibraryExistsError if the library exists, LibraryBusyError if another build (a
        thread of this process or another process) holds the name. Pass the reservation to
        ``build``, or ``release()`` it if the build never starts (a cancelled job)."""
        if self.exists(name):
            raise LibraryExistsError(name, self.root)
        lock = lock_build(self.root, name)
        if self.exists(name):  # a build finished between the check and the lock
            lock.release()
            raise LibraryExistsError(name, self.root)
        return lock

    def exists(self, name: str) -> bool:
        return (self.root / validate_name(name)).is_dir()

    def build(
        self,
        name: str,
        documents: Sequence[tuple[str, str | Sequence[int]]],
        chunk_size: int | None = None,
        mode: str = "prefix",
        *,
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
        routing_rank: int | None = None,
        kv_dtype: str = "auto",
        independent: Any = None,
        boundary_repair: Any = None,
        keep_loaded: bool = True,
        reservation: BuildLock | None = None,
        on_progress: ProgressHook | None = None,
    ) -> LibraryInfo:
        """Build ``name`` from ``(name, text)`` (or ``(name, token_ids)``) documents;
        LibraryExistsError if the name is taken, LibraryBusyError at once if it is being
        built. ``reservation`` (from ``reserve(name)``) is taken over; either way the name
        is released when the build ends (success, failure or cancel). ``on_progress(done,
        total)`` sees the prefill and may raise to stop it (``prefill_corpus``).
        ``independent``: ``positions.IndependentOptions`` (None: the measured defaults).
        ``boundary_repair``: ``BoundaryRepair(tokens, layers)`` or the pair (None: none;
        ``library/boundary_repair.py``). ``chunk_size`` None: a power of two giving about
        32 chunks, 64 to 4,096 tokens."""
        if self.loaded_model is None:
            if reservation is not None:
                reservation.release()
            raise LibraryError("building a library needs a model: start the manager with one")
        lock = reservation if reservation is not None else self.reserve(name)
        with lock:
            assert lock.name == name, (lock.name, name)
            info, library = build_and_save(
                self.loaded_model,
                documents,
                name,
                self.root,
                chunk_size=chunk_size,  # None: scales with the library's token count
                mode=mode,
                prefill_tokens=prefill_tokens,
                routing_rank=routing_rank,
                kv_dtype=kv_dtype,
                independent=independent,
                boundary_repair=boundary_repair,
                progress=self.progress,
                on_progress=on_progress,
            )
        if keep_loaded and library.device == self.device:
            with self._lock:
                self._register(name, library)
        return info

    def get(self, name: str) -> LoadedLibrary:
        """The loaded library ``name``, loading it on first use (the lock is held while
        loading, so concurrent callers load once). Requests should ``acquire`` instead."""
        with self._lock:
            if name in self._deleting:
                raise LibraryDeletingError(name)
            library = self._loaded.get(name)
            if library is None:
                self._dir(name)
                with self.checksum_failures.watch(name):  # a corrupt build: 409 at once
                    check_memory(self, name)  # LibraryMemoryError rather than an OOM
                    library = load_library(
                        self.root,
                        name,
                        self.fingerprint,
                        self.device,
                        progress=self.progress,
                        tiers=self.tiers,
                        reserve=self._reserve,
                        **self.load_options,
                    )
                self._register(name, library)
            return library

    def load_built(self, name: str) -> LoadedLibrary:
        """``get(name)`` for a library another process just built and saved (the server's
        build process): it loads outside the manager's lock, so requests acquiring other
        libraries meanwhile do not wait for the load. A copy loaded meanwhile is kept."""
        with self._lock:
            check_memory(self, validate_name(name))
        with self.checksum_failures.watch(name):
            library = load_library(
                self.root,
                name,
                self.fingerprint,
                self.device,
                progress=False,
                tiers=self.tiers,
                reserve=self._reserve,
                **self.load_options,
            )
        with self._lock:
            if name in self._deleting:
                raise LibraryDeletingError(name)
            current = self._loaded.get(name)
            if current is not None:
                return current
            self._register(name, library)
            return library

    def acquire(self, name: str) -> LoadedLibrary:
        """``get(name)`` for a request that will read it until ``release``: while any
        request holds it, ``delete(name)`` refuses (LibraryInUseError) instead of pulling
        the KV from under running requests."""
        with self._lock:
            library = self.get(name)
            self._refs[library.build_id] = self._refs.get(library.build_id, 0) + 1
            return library

    def release(self, library: LoadedLibrary) -> None:
        """A request that acquired ``library`` has ended."""
        with self._lock:
            n = self._refs.get(library.build_id, 0) - 1
            assert n >= 0, f"release of {library.name!r} without acquire"
            if n:
                self._refs[library.build_id] = n
            else:
                self._refs.pop(library.build_id, None)
            self._released.notify_all()

    def num_users(self, name: str) -> int:
        """Requests holding the loaded build of ``name`` now (0 when it is not loaded)."""
        with self._lock:
            library = self._loaded.get(name)
            return 0 if library is None else self._refs.get(library.build_id, 0)

    def _register(self, name: str, library: LoadedLibrary) -> None:
        """Keep ``library`` loaded under ``name`` and hold a shared lock on its manifest,
        so that another process (``moska library rm``) cannot delete it meanwhile. A library
        built in memory moves into the slot space when it fits."""
        self._unregister(name)
        if library.arena_range is None and library.tiers is None and not library.kv_scale_pools:
            arena = self._arena_for(library.manifest, library_layout(library))
            if arena is not None:
                arena.place(library)
        attach_at_register(name, library, self.fp8_attention)
        self._loaded[name] = library
        self._holds.hold(name)

    def _unregister(self, name: str) -> bool:
        self._holds.drop(name)
        return self._loaded.pop(name, None) is not None

    # -- the slot space (library/arena.py) ----------------------------------------------

    def _arena_for(self, manifest: Manifest, layout: ArenaLayout, need: int = 0):
        """The arena a library of ``layout`` goes into (made now if there is none yet and
        it would hold this library's ``need`` rows, default all), or None: its own pools."""
        with self._lock:
            if self.arena is not None:
                return self.arena if self.arena.fits(layout) else None
            rows = arena_rows(self, manifest, layout)
            if rows < (need or manifest.num_tokens):
                return None
            self.arena = KVArena(layout, rows)
            logger.info(
                "library arena: %d rows (%.2f GiB) on %s for the KV of every resident library",
                rows, self.arena.nbytes / 2**30, layout.device,
            )  # fmt: skip
            return self.arena

    def _reserve(self, manifest: Manifest, layout: ArenaLayout, rows: int = 0) -> ArenaRange | None:
        """Rows of the slot space (``rows``, default all: a tiered library's GPU slots are
        fewer) for a library being loaded (load_library's ``reserve``)."""
        arena = self._arena_for(manifest, layout, rows)
        if arena is None:
            return None
        try:
            return arena.allocate(rows or manifest.num_tokens)
        except ArenaFullError as e:
            logger.warning("library %s keeps pools of its own: %s", manifest.name, e)
            return None

    def unload(self, name: str) -> bool:
        with self._lock:
            return self._unregister(name)

    def loaded_names(self) -> builtins.list[str]:
        with self._lock:
            return sorted(self._loaded)

    def tier_stats(self) -> dict[str, dict]:
        """{name: TierStats.as_dict()} of the loaded libraries served from tiers."""
        with self._lock:
            loaded = dict(self._loaded)
        return {n: lib.tiers.stats.as_dict() for n, lib in loaded.items() if lib.tiers is not None}

    def delete(self, name: str, wait_s: float = 0.0) -> None:
        """Unload and remove ``name``. LibraryNotFoundError if there is none;
        LibraryInUseError if requests still read it (after waiting up to ``wait_s`` seconds
        for them to end; new requests are refused meanwhile) or another process has it
        loaded. A refused delete changes nothing."""
        deadline = time.monotonic() + max(0.0, wait_s)
        with self._lock:
            self._dir(name)
            self._deleting.add(name)
            try:
                while (users := self.num_users(name)) and time.monotonic() < deadline:
                    self._released.wait(timeout=deadline - time.monotonic())
                if users:
                    raise LibraryInUseError(name, users)
                self._unregister(name)
                self._delete_files(name)
                self.checksum_failures.forget(name)
            finally:
                self._deleting.discard(name)

    def _delete_files(self, name: str) -> None:
        delete_unheld(self.root, name)  # LibraryInUseError while another process holds it
