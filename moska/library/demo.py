"""The demo library `moska serve` builds from the corpus bundled in moska/data/demo_library."""

from __future__ import annotations

from typing import Any

from moska.library.documents import demo_documents
from moska.library.info import LibraryInfo

DEMO_LIBRARY_NAME = "demo"
DEMO_CHUNK_SIZE = 256  # the corpus is ~4K tokens with the byte tokenizer: ~16 chunks


def ensure_demo_library(
    manager: Any, name: str = DEMO_LIBRARY_NAME, chunk_size: int = DEMO_CHUNK_SIZE
) -> LibraryInfo:
    """Build the demo library with the manager's model unless one fit for it exists; a demo
    library built for another model, or damaged, is rebuilt (it is ours to replace)."""
    if manager.exists(name):
        info = manager.info(name)
        if info.compatible is not False and getattr(info, "status", "ok") == "ok":
            return info
        manager.delete(name)
    return manager.build(name, demo_documents(), chunk_size=chunk_size, mode="prefix")
