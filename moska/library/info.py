"""What `ls`/`info` report about a library, and the statistics of a build. Plain Python."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moska.library.format import Manifest, ModelFingerprint, dir_size


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


@dataclass(frozen=True)
class LibraryInfo:
    name: str
    num_tokens: int
    num_chunks: int
    chunk_size: int
    mode: str  # "prefix" | "independent"
    compatible: bool | None  # built for the manager's model? None when no model is given
    created: str  # ISO 8601, UTC
    size_bytes: int
    num_documents: int
    num_layers: int
    position_offset: int
    routing_rank: int
    model: str  # the fingerprint of the model it was built for, in words
    path: str
    build: BuildStats | None = None

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
            size_bytes=dir_size(path) if path.is_dir() else 0,
            num_documents=len(manifest.documents),
            num_layers=manifest.num_layers,
            position_offset=manifest.position_offset,
            routing_rank=manifest.routing_rank,
            model=manifest.model.describe(),
            path=str(path),
            build=build if build is not None else BuildStats.from_dict(manifest.build),
        )
