"""The shared KV library: documents -> prefill -> chunk KV -> routing index -> disk."""

from moska.library.boundary_repair import BoundaryRepair, BoundaryRepairError
from moska.library.builder import build_from_corpus, build_in_memory, build_library
from moska.library.chunking import TokenizedCorpus, corpus_from_token_ids, tokenize_documents
from moska.library.demo import ensure_demo_library
from moska.library.documents import demo_documents, read_documents
from moska.library.errors import (
    ChecksumMismatchError,
    CorruptLibraryError,
    DocumentError,
    FingerprintMismatchError,
    InvalidLibraryNameError,
    LibraryBusyError,
    LibraryError,
    LibraryExistsError,
    LibraryNotFoundError,
)
from moska.library.format import (
    ChunkEntry,
    ChunkSpan,
    Manifest,
    ModelFingerprint,
    model_fingerprint,
)
from moska.library.info import BuildStats, LibraryInfo
from moska.library.loaded import LoadedLibrary, load_library
from moska.library.manager import LibraryManager, default_library_root
from moska.library.store import save_library

__all__ = [
    "BoundaryRepair",
    "BoundaryRepairError",
    "BuildStats",
    "ChecksumMismatchError",
    "ChunkEntry",
    "ChunkSpan",
    "CorruptLibraryError",
    "DocumentError",
    "FingerprintMismatchError",
    "InvalidLibraryNameError",
    "LibraryBusyError",
    "LibraryError",
    "LibraryExistsError",
    "LibraryInfo",
    "LibraryManager",
    "LibraryNotFoundError",
    "LoadedLibrary",
    "Manifest",
    "ModelFingerprint",
    "TokenizedCorpus",
    "build_from_corpus",
    "build_in_memory",
    "build_library",
    "corpus_from_token_ids",
    "default_library_root",
    "demo_documents",
    "ensure_demo_library",
    "load_library",
    "model_fingerprint",
    "read_documents",
    "save_library",
    "tokenize_documents",
]
