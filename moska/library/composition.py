"""Universal MoSKA: one request reads several position-independent libraries at once.

A request names libraries ``["a", "b"]`` (``libraries=[...]`` in Python, ``"library": [...]``
over HTTP). Each must be position-independent (every chunk was prefilled alone, so its KV
does not depend on what precedes it; a prefix-mode library's KV is one context and has a
place in it) and built for the same model. ``ComposedLibrary`` is what such a request holds
from admission to its end: the loaded builds of its libraries (acquired at admission,
released at the end), seen as one library whose chunks are the parts' chunks one after the
other (global chunk id = the part's base + its local id); their KV sits in the engine's one
slot space (library/arena.py), so one grouped launch reads them all. The runner groups rows
by its ``build_id`` (the parts' build ids in the order named), so requests with different
library sets are different groups of one batch; ``moska/attention/composed.py`` serves a
group.

Position: a request's own tokens start at the largest ``position_offset`` of its parts (an
independent library's offset is its chunk size plus the chunk sink). Every chunk then sits
before the request, as in a single library; a chunk of a smaller library is further from the
request than it would be alone (RoPE sees a larger distance), which is what a single library
of mixed chunk lengths does to its shorter chunks too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moska.library.errors import LibraryError
from moska.library.format import ChunkSpan

FIELD = "library"  # the request field (HTTP) that names the libraries


class CompositionError(LibraryError):
    """Libraries that cannot be composed; ``library`` names the offending one (None when
    the list itself is wrong) and ``param`` the request field."""

    def __init__(self, message: str, library: str | None = None) -> None:
        super().__init__(message)
        self.library = library
        self.param = FIELD


def library_names(library: str | Sequence[str] | None) -> list[str]:
    """The names a request's ``library`` value asks for: [] for None, [name] for a string,
    the list otherwise (checked: non-empty, strings, no repeats)."""
    if library is None:
        return []
    if isinstance(library, str):
        return [library]
    names = list(library)
    if not names:
        raise CompositionError("library: name at least one library, or leave the field out")
    for name in names:
        if not isinstance(name, str):
            raise CompositionError(f"library: names must be strings, got {name!r}")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise CompositionError(f"library {name!r} is named twice: name each once", name)
        seen.add(name)
    return names


def check_composable(parts: Sequence[Any]) -> None:
    """Raise CompositionError unless ``parts`` (loaded libraries or their infos) can be read
    together: each position-independent and built for the same model as the first."""
    if len(parts) < 2:
        return
    for part in parts:
        if getattr(part, "mode", None) != "independent":
            raise CompositionError(
                f"library {part.name!r} is a prefix-mode library (one context with a place "
                "in it) and cannot be composed with others: rebuild it with "
                "`--mode independent`, or send it alone",
                part.name,
            )
    first = parts[0]
    for part in parts[1:]:
        fields = _model_mismatches(first, part)
        if fields:
            raise CompositionError(
                f"library {part.name!r} was built for another model than {first.name!r} "
                f"(differs in: {', '.join(fields)}): compose libraries built for one model",
                part.name,
            )


def _model_mismatches(a: Any, b: Any) -> list[str]:
    ma = getattr(getattr(a, "manifest", None), "model", None)
    mb = getattr(getattr(b, "manifest", None), "model", None)
    if ma is not None and mb is not None:
        return ma.mismatches(mb)
    wa, wb = getattr(a, "model", None), getattr(b, "model", None)  # LibraryInfo: in words
    return ["model"] if wa is not None and wb is not None and wa != wb else []


@dataclass(eq=False)
class ComposedLibrary:
    """Several loaded position-independent libraries read as one (see the module doc).
    Satisfies ``engine.request.LibraryHandle``; ``parts`` are what was acquired."""

    parts: tuple[Any, ...]  # LoadedLibrary, in the order the request named them
    bases: tuple[int, ...] = field(init=False)  # global id of each part's chunk 0
    # the launch groups: ChunkTables over the global chunk ids into the arena (or a part's
    # own pools) that attention/composed.py builds once per composition
    slot_tables: list[Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.parts) < 2:
            raise CompositionError("a composition needs at least two libraries")
        check_composable(self.parts)
        bases, n = [], 0
        for part in self.parts:
            bases.append(n)
            n += part.num_chunks
        self.bases = tuple(bases)

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)

    @property
    def build_id(self) -> str:
        return "compose:" + "+".join(p.build_id for p in self.parts)

    @property
    def mode(self) -> str:
        return "independent"

    @property
    def position_offset(self) -> int:
        return max(p.position_offset for p in self.parts)

    @property
    def chunk_sink(self) -> bool:
        """The request brings the BOS when any part stores no sink (positions.py)."""
        return any(bool(getattr(p.manifest, "chunk_sink", False)) for p in self.parts)

    @property
    def num_chunks(self) -> int:
        return sum(p.num_chunks for p in self.parts)

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)

    @property
    def chunk_size(self) -> int:
        return max(p.chunk_size for p in self.parts)

    @property
    def num_kv_layers(self) -> int:
        return self.parts[0].num_kv_layers

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def tiers(self) -> None:
        """Tiered parts fetch into their slots per layer (attention/composed_tiers.py) and
        are read in the composition's launch; the composition itself has no tiers."""
        return None

    def locate(self, chunk: int) -> tuple[int, int]:
        """(part index, local chunk id) of global chunk ``chunk``."""
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} out of range [0, {self.num_chunks})")
        i = max(j for j, b in enumerate(self.bases) if b <= chunk)
        return i, chunk - self.bases[i]

    def chunk_span(self, chunk: int) -> ChunkSpan:
        """The span of global chunk ``chunk``: its document as ``library/document`` and its
        rows in its own library's token stream."""
        i, local = self.locate(chunk)
        part = self.parts[i]
        span = part.chunk_span(local)
        doc = None if span.document is None else f"{part.name}/{span.document}"
        return ChunkSpan(chunk, doc, span.start, span.end)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def parts_of(library: Any) -> tuple[Any, ...]:
    """The acquired libraries behind a request's handle: its parts, itself, or none."""
    if library is None:
        return ()
    if isinstance(library, ComposedLibrary):
        return library.parts
    return (library,)


def is_composed(library: Any) -> bool:
    return isinstance(library, ComposedLibrary)


@dataclass(frozen=True)
class CompositionSummary:
    """What the server needs of a composition before the engine holds it (BOS, positions,
    admission cost), from the parts' loaded builds or manifest infos."""

    name: str
    position_offset: int
    chunk_sink: bool
    num_chunks: int
    chunk_size: int
    num_tokens: int


def summarize(parts: Sequence[Any]) -> CompositionSummary:
    """Check that ``parts`` compose (CompositionError otherwise) and sum them up."""
    check_composable(parts)

    def sink(p: Any) -> bool:
        return bool(getattr(getattr(p, "manifest", p), "chunk_sink", False))

    return CompositionSummary(
        name="+".join(p.name for p in parts),
        position_offset=max(int(p.position_offset or 0) for p in parts),
        chunk_sink=any(sink(p) for p in parts),
        num_chunks=sum(int(p.num_chunks or 0) for p in parts),
        chunk_size=max(int(p.chunk_size or 0) for p in parts),
        num_tokens=sum(int(p.num_tokens or 0) for p in parts),
    )
