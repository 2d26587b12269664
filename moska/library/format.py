"""On-disk layout of a library and its manifest. Plain Python, no torch.

A library lives in ``<root>/<name>/``::

    manifest.json              # Manifest below; written last
    layer_000.safetensors      # k, v [S_total, Hkv, D] and the layer's routing index
    layer_001.safetensors      #   tensors ("index.<field>"), one file per layer
    ...

Builds write into ``<root>/.<name>.tmp-<uuid>/`` (with a ``BUILDING`` file naming the
owner pid), fsync every file and the directory, then rename it to ``<root>/<name>/``: an
interrupted build leaves only a hidden tmp directory, which listing ignores and the
manager removes once its owner is gone.

The model fingerprint is in ``library/fingerprint.py`` and the durable-file helpers in
``library/durable.py``; both are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from moska.library.durable import dir_size, fsync_dir, sha256_file, write_durable
from moska.library.errors import CorruptLibraryError, InvalidLibraryNameError
from moska.library.fingerprint import ModelFingerprint, model_fingerprint, weights_hash

__all__ = [
    "BUILDING_FILE",
    "BUILD_KV_DTYPES",
    "FORMAT_VERSION",
    "FP8_FORMATS",
    "KV_DTYPES",
    "MANIFEST_FILE",
    "MODES",
    "TMP_MARKER",
    "TOKENS_FILE",
    "ChunkEntry",
    "ChunkSpan",
    "DocumentEntry",
    "Manifest",
    "ModelFingerprint",
    "dir_size",
    "fsync_dir",
    "is_tmp_dir",
    "layer_file",
    "library_files",
    "model_fingerprint",
    "read_manifest",
    "sha256_file",
    "tmp_dir_name",
    "validate_file_name",
    "validate_name",
    "weights_hash",
    "write_durable",
]

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENS_FILE = "tokens.safetensors"
BUILDING_FILE = "BUILDING"
TMP_MARKER = ".tmp-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MODES = ("prefix", "independent")
# library KV dtypes: "auto" = the model's; "fp8" = e4m3 pools with fp32 scales per (token,
# KV head) stored as "k_scale"/"v_scale" [S_total, Hkv] in each layer file (library/fp8.py)
KV_DTYPES = ("auto", "fp8")
# how an FP8 library's pools are laid out (manifest.fp8_format): "token" = as above; "rotated"
# = K stored Hadamard-rotated (k R, R = library/fp8.hadamard(head_dim, seed 0)) and K and V
# scales per 128-row block (stored per row, constant over a block): readers rotate q alike
# (library/fp8_rotated.py). A build asks for it as kv_dtype "fp8_rotated" (BUILD_KV_DTYPES);
# the manifest then says kv_dtype "fp8", fp8_format "rotated", so every FP8 reader reads it
FP8_FORMATS = ("token", "rotated")
BUILD_KV_DTYPES = (*KV_DTYPES, "fp8_rotated")


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid library name, else raise InvalidLibraryNameError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidLibraryNameError(name)
    return name


def validate_file_name(fname: object) -> str:
    """Return ``fname`` if it may name a file of a library's folder, else raise ValueError.

    A manifest is data read from disk, so its file names are checked before any is opened:
    a plain name (no path separator, not absolute, not hidden, not ``..``) can only point
    inside the library's folder; ``../../x`` or ``/etc/x`` would point outside it.
    """
    if (
        not isinstance(fname, str)
        or not fname
        or len(fname) > 255
        or fname.startswith(".")
        or "/" in fname
        or "\\" in fname
        or "\0" in fname
        or os.path.isabs(fname)
        or Path(fname).name != fname
    ):
        raise ValueError(f"file name {fname!r} is not a plain name inside the library folder")
    return fname


def layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


def is_tmp_dir(dirname: str) -> bool:
    """True for a build's temporary directory (hidden, never a library)."""
    return dirname.startswith(".") and TMP_MARKER in dirname


def tmp_dir_name(name: str, token: str) -> str:
    return f".{name}{TMP_MARKER}{token}"


# ---------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ChunkEntry:
    """Chunk ``chunk`` is rows ``start:end`` of every layer's pool, at positions
    ``pos_start .. pos_start + end - start - 1``; document ``document`` (an index into the
    manifest's documents) holds its first token; None when the manifest does not say."""

    chunk: int
    document: int | None
    start: int
    end: int
    pos_start: int

    def __post_init__(self) -> None:
        assert 0 <= self.start < self.end and self.pos_start >= 0, self


@dataclass(frozen=True)
class DocumentEntry:
    """Document ``name`` is rows ``start:end`` of the pool (its separator included)."""

    name: str
    num_tokens: int
    start: int
    end: int


class ChunkSpan(NamedTuple):
    """Where chunk ``chunk`` came from, for a person reading a routing report: the name of
    the document holding its first token (None when the manifest predates document spans)
    and its token span ``[start, end)`` in the library's token stream (pool rows)."""

    chunk: int
    document: str | None
    start: int
    end: int


@dataclass(frozen=True)
class Manifest:
    name: str
    created: str  # ISO 8601, UTC
    model: ModelFingerprint
    mode: str  # "prefix" | "independent"
    chunk_size: int
    num_tokens: int  # S_total, rows of every layer's pool
    position_offset: int  # position of a request's first own token
    begins_with_bos: bool
    chunks: tuple[ChunkEntry, ...]
    documents: tuple[DocumentEntry, ...]
    routing_rank: int
    files: dict[str, str]  # filename -> sha256 hex
    build: dict[str, float] = field(default_factory=dict)  # seconds, tokens_per_s, ...
    format_version: int = FORMAT_VERSION
    # A fresh id per build: caches (prefix cache, CUDA graphs) key on it, never on the name,
    # so a library rebuilt under the same name never reuses the old build's KV. Manifests
    # written before build ids existed get one derived from their file checksums on load.
    build_id: str = ""
    kv_dtype: str = "auto"  # KV_DTYPES; manifests written before FP8 libraries: "auto"
    # Position-independent libraries (library/positions.py): each chunk was prefilled after
    # the model's BOS, whose row is not stored (a request brings its own BOS); and the
    # library part's attention is tempered as in APE: its logits times 1/temperature, its
    # LSE plus log_scale in the merge (1.0 and 0.0: exact attention).
    chunk_sink: bool = False
    attention_temperature: float = 1.0
    attention_log_scale: float = 0.0
    # Boundary repair (library/boundary_repair.py): the first repair_tokens rows of every
    # chunk that continues a document were recomputed after the chunk before it, in the
    # first repair_layers KV layers. 0 and 0: none (and manifests written before repair).
    repair_tokens: int = 0
    repair_layers: int = 0
    fp8_format: str = "token"  # FP8_FORMATS (kv_dtype "fp8" only); older manifests: "token"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if self.fp8_format not in FP8_FORMATS:
            raise ValueError(f"fp8_format must be one of {FP8_FORMATS}, got {self.fp8_format!r}")
        if self.fp8_format != "token" and self.kv_dtype != "fp8":
            raise ValueError(f"fp8_format {self.fp8_format!r} needs kv_dtype 'fp8'")
        validate_name(self.name)
        if not isinstance(self.files, dict) or not all(
            isinstance(v, str) for v in self.files.values()
        ):
            raise ValueError("files must map file names to sha256 hex digests")
        for fname in self.files:
            validate_file_name(fname)
        bounds = [c.start for c in self.chunks] + [self.num_tokens]
        assert bounds[0] == 0 and all(c.end == b for c, b in zip(self.chunks, bounds[1:])), (
            "chunk table must tile [0, num_tokens)"
        )

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def num_kv_layers(self) -> int:
        """Layers of KV stored, one file each (fewer than num_layers for an MLKV model)."""
        return self.model.num_kv_layers or self.model.num_layers

    @property
    def chunk_offsets(self) -> list[int]:
        return [c.start for c in self.chunks] + [self.num_tokens]

    def chunk_span(self, chunk: int) -> ChunkSpan:
        """The document and token span of chunk ``chunk`` (IndexError if there is none)."""
        if not 0 <= chunk < len(self.chunks):
            raise IndexError(f"chunk {chunk} out of range [0, {len(self.chunks)})")
        c = self.chunks[chunk]
        doc = c.document
        name = (
            self.documents[doc].name if doc is not None and 0 <= doc < len(self.documents) else None
        )
        return ChunkSpan(chunk, name, c.start, c.end)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["chunks"] = [dataclasses.asdict(c) for c in self.chunks]
        d["documents"] = [dataclasses.asdict(x) for x in self.documents]
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise TypeError(f"a manifest is a JSON object, not {type(d).__name__}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"format version {version!r} is not supported (this moska reads {FORMAT_VERSION})"
            )
        d["model"] = ModelFingerprint.from_dict(d["model"])
        d["chunks"] = tuple(ChunkEntry(**{"document": None, **c}) for c in d["chunks"])
        # manifests that predate document spans load without them (reports say null)
        d["documents"] = tuple(DocumentEntry(**x) for x in d.get("documents") or ())
        return cls(**d)


def read_manifest(directory: Path) -> Manifest:
    """Parse ``directory/manifest.json``; CorruptLibraryError if missing or malformed."""
    path = directory / MANIFEST_FILE
    try:
        return Manifest.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CorruptLibraryError(directory.name, MANIFEST_FILE, "manifest missing") from e
    except OSError as e:  # its str() holds the path: keep only the reason
        reason = f"unreadable manifest ({e.strerror or type(e).__name__})"
        raise CorruptLibraryError(directory.name, MANIFEST_FILE, reason) from e
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as e:
        reason = f"unreadable manifest ({type(e).__name__}: {e})"
        raise CorruptLibraryError(directory.name, MANIFEST_FILE, reason) from e


def library_files(directory: Path, manifest: Manifest) -> list[Path]:
    """The paths of the files the manifest lists, each checked to lie inside ``directory``
    (names are validated when the manifest is parsed; this also refuses a symbolic link
    that leads out of the folder). CorruptLibraryError for a missing or outside file."""
    needed = [layer_file(i) for i in range(manifest.num_kv_layers)] + [TOKENS_FILE]
    for f in needed:
        if f not in manifest.files:
            raise CorruptLibraryError(manifest.name, f, "not listed in manifest.json")
    inside = directory.resolve()
    paths = []
    for f in manifest.files:
        p = directory / validate_file_name(f)
        if p.resolve().parent != inside:
            raise CorruptLibraryError(manifest.name, f, "leads outside the library folder")
        if not p.is_file():
            raise CorruptLibraryError(manifest.name, f, "file missing")
        paths.append(p)
    return paths
