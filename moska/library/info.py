"""What `ls`/`info` report about a library, and the statistics of a build. Plain Python."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from moska.library.errors import CorruptLibraryError
from moska.library.format import (
    Manifest,
    ModelFingerprint,
    dir_size,
    library_files,
    read_manifest,
)


def _size(path: Path) -> int:
    try:
        return dir_size(path) if path.is_dir() else 0
    except OSError:  # a file vanished or is unreadable: the size is a hint only
        return 0


@dataclass(frozen=True)
class BuildStats:
    """Timing of one build. ``tokens_per_s`` is the prefill rate (num_tokens /
    prefill_seconds), the number to compute MFU from; ``seconds`` is the whole build."""

    num_tokens: int
    seconds: float
    prefill_seconds: float
    routing_seconds: float = 0.0
    save_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "num_tokens": self.num_tokens,
            "seconds": self.seconds,
            "prefill_seconds": self.prefill_seconds,
            "routing_seconds": self.routing_seconds,
            "save_seconds": self.save_seconds,
            "tokens_per_s": self.tokens_per_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> BuildStats | None:
        if not d:
            return None
        return cls(
            int(d["num_tokens"]),
            d["seconds"],
            d["prefill_seconds"],
            d.get("routing_seconds", 0.0),
            d.get("save_seconds", 0.0),
        )


class LibraryStatus(StrEnum):
    """A listed library's state (a ``str``: JSON and the CLI show the value)."""

    OK = "ok"
    DAMAGED = "damaged"  # manifest missing or unreadable, or a file it lists missing/outside
    CORRUPT = "corrupt"  # a file failed its checksum on a load (checksum_failures.py)


OK = LibraryStatus.OK
DAMAGED = LibraryStatus.DAMAGED
CORRUPT = LibraryStatus.CORRUPT


@dataclass(frozen=True)
class LibraryInfo:
    """What ``ls``/``info`` show. ``status`` is ``"ok"``, or ``"damaged"`` when the manifest
    is missing or unreadable or a file it lists is missing or outside the folder; a damaged
    library is still listed (so it can be seen and removed) with ``reason`` saying why, and
    the fields its manifest would have given are None. Checksums are checked on load only:
    a build whose load failed them is ``"corrupt"`` (its manifest's fields are kept) until
    it is rebuilt or its files change (the manager's ``checksum_failures``).
    """

    name: str
    num_tokens: int | None
    num_chunks: int | None
    chunk_size: int | None
    mode: str | None  # "prefix" | "independent"
    compatible: bool | None  # built for the manager's model? None when no model is given
    created: str | None  # ISO 8601, UTC
    size_bytes: int
    num_documents: int | None
    num_layers: int | None
    position_offset: int | None
    routing_rank: int | None
    model: str | None  # the fingerprint of the model it was built for, in words
    path: str
    build: BuildStats | None = None
    status: LibraryStatus = LibraryStatus.OK
    reason: str | None = None  # why it is damaged
    chunk_sink: bool = False  # independent mode: a request brings the BOS (positions.py)
    kv_dtype: str = "auto"  # "fp8": e4m3 KV with per-(token, KV head) scales (fp8.py)
    # boundary repair (boundary_repair.py): first tokens of continuing chunks, in L layers
    repair_tokens: int = 0
    repair_layers: int = 0
    fp8_format: str = "token"  # FP8: "rotated" = K Hadamard-rotated, block scales (fp8_rotated.py)

    @classmethod
    def damaged(cls, name: str, path: Path, reason: str) -> LibraryInfo:
        return cls(
            name=name,
            num_tokens=None,
            num_chunks=None,
            chunk_size=None,
            mode=None,
            compatible=None,
            created=None,
            size_bytes=_size(path),
            num_documents=None,
            num_layers=None,
            position_offset=None,
            routing_rank=None,
            model=None,
            path=str(path),
            status=DAMAGED,
            reason=reason,
        )

    @classmethod
    def from_dir(cls, path: Path, fingerprint: ModelFingerprint | None = None) -> LibraryInfo:
        """The info of the library in folder ``path``, damaged rather than an error when
        its manifest or files are (reads the manifest and stats the files, no checksums)."""
        try:
            manifest = read_manifest(path)
            library_files(path, manifest)
        except CorruptLibraryError as e:
            return cls.damaged(path.name, path, f"{e.file}: {e.reason}")
        return cls.from_manifest(manifest, path, fingerprint)

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        path: Path,
        fingerprint: ModelFingerprint | None = None,
        build: BuildStats | None = None,
    ) -> LibraryInfo:
        compatible = None if fingerprint is None else not manifest.model.mismatches(fingerprint)
        return cls(
            name=manifest.name,
            num_tokens=manifest.num_tokens,
            num_chunks=manifest.num_chunks,
            chunk_size=manifest.chunk_size,
            mode=manifest.mode,
            compatible=compatible,
            created=manifest.created,
            size_bytes=_size(path),
            num_documents=len(manifest.documents),
            num_layers=manifest.num_layers,
            position_offset=manifest.position_offset,
            routing_rank=manifest.routing_rank,
            model=manifest.model.describe(),
            path=str(path),
            build=build if build is not None else BuildStats.from_dict(manifest.build),
            chunk_sink=manifest.chunk_sink,
            kv_dtype=manifest.kv_dtype,
            repair_tokens=manifest.repair_tokens,
            repair_layers=manifest.repair_layers,
            fp8_format=manifest.fp8_format,
        )
