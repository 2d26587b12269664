"""Documents -> one token stream, the chunk table and the prefill sequences. Plain Python.

Length vocabulary: ``num_tokens`` (S_total) rows in every layer's pool; chunk ``c`` is rows
``chunk_offsets[c] : chunk_offsets[c+1]``; a *sequence* is a row range prefilled as one
causal context, with positions starting at 0 at its first row.

- prefix mode: the documents form ONE sequence (positions 0..S-1); the first document keeps
  the tokenizer's special tokens (BOS), later ones do not, and a newline token sequence
  separates documents (counted in the document before it). Chunks are consecutive
  ``chunk_size`` slices of the stream (the last may be shorter) and may span documents.
  A request's own tokens start at position ``num_tokens``.
- independent mode: each document is tokenized alone (no special tokens), split into
  ``chunk_size`` slices, and each chunk is its own sequence (positions 0..len-1). Chunks
  never span documents. A request's own tokens start at position ``chunk_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moska.library.errors import DocumentError, LibraryError
from moska.library.format import MODES, ChunkEntry, DocumentEntry


@dataclass(frozen=True)
class TokenizedCorpus:
    mode: str
    chunk_size: int
    token_ids: list[int]  # [num_tokens]
    chunks: tuple[ChunkEntry, ...]
    documents: tuple[DocumentEntry, ...]
    begins_with_bos: bool = False

    def __post_init__(self) -> None:
        assert self.chunks and self.chunks[-1].end == self.num_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def chunk_offsets(self) -> list[int]:
        return [c.start for c in self.chunks] + [self.num_tokens]

    @property
    def position_offset(self) -> int:
        return self.num_tokens if self.mode == "prefix" else self.chunk_size

    @property
    def sequences(self) -> list[tuple[int, int]]:
        """Row ranges ``(start, end)`` each prefilled as one causal context from position 0."""
        if self.mode == "prefix":
            return [(0, self.num_tokens)]
        return [(c.start, c.end) for c in self.chunks]


def check_mode(mode: str, chunk_size: int) -> None:
    if mode not in MODES:
        raise LibraryError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise LibraryError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def corpus_from_token_ids(
    docs: Sequence[tuple[str, Sequence[int]]],
    mode: str = "prefix",
    chunk_size: int = 4096,
    begins_with_bos: bool = False,
) -> TokenizedCorpus:
    """Chunk already tokenized documents (separators and BOS included by the caller)."""
    check_mode(mode, chunk_size)
    if not docs:
        raise LibraryError("a library needs at least one document")
    token_ids: list[int] = []
    documents: list[DocumentEntry] = []
    chunks: list[ChunkEntry] = []
    for d, (name, ids) in enumerate(docs):
        if len(ids) == 0:
            raise DocumentError(f"document {name!r} has no tokens; remove it from the inputs")
        start = len(token_ids)
        token_ids.extend(int(t) for t in ids)
        documents.append(DocumentEntry(name, len(ids), start, len(token_ids)))
        if mode == "independent":
            for s in range(start, len(token_ids), chunk_size):
                end = min(s + chunk_size, len(token_ids))
                chunks.append(ChunkEntry(len(chunks), d, s, end, 0))
    if mode == "prefix":
        doc = 0
        for s in range(0, len(token_ids), chunk_size):
            while documents[doc].end <= s:
                doc += 1
            chunks.append(ChunkEntry(len(chunks), doc, s, min(s + chunk_size, len(token_ids)), s))
    return TokenizedCorpus(
        mode, chunk_size, token_ids, tuple(chunks), tuple(documents), begins_with_bos
    )


def tokenize_documents(
    tokenizer: Any,
    documents: Sequence[tuple[str, str | Sequence[int]]],
    mode: str = "prefix",
    chunk_size: int | None = 4096,
) -> TokenizedCorpus:
    """Tokenize ``(name, text)`` documents and chunk them (see the module docstring).

    A document given as a sequence of token ids instead of text is used verbatim (no BOS,
    no separator added); ``tokenizer`` may then be None. ``chunk_size`` None: the size that
    scales with the library (``routing.policy.default_chunk_size`` of its token count), so
    that a small library is still cut into chunks the router can choose among.
    """
    check_mode(mode, 1 if chunk_size is None else chunk_size)
    if not documents:
        raise LibraryError("a library needs at least one document")

    def encode(text: str, special: bool) -> list[int]:
        if tokenizer is None:
            raise LibraryError(
                "the model has no tokenizer (tokenizer.json): add one to the model directory "
                "or pass documents as token ids"
            )
        return list(tokenizer.encode(text, add_special_tokens=special))

    docs: list[tuple[str, list[int]]] = []
    for i, (name, text) in enumerate(documents):
        if not isinstance(text, str):
            docs.append((name, [int(t) for t in text]))
        elif mode == "prefix":
            ids = encode(text, i == 0)
            if i + 1 < len(documents) and isinstance(documents[i + 1][1], str):
                ids += encode("\n", False)
            docs.append((name, ids))
        else:
            docs.append((name, encode(text, False)))
    bos = getattr(tokenizer, "bos_token_id", None)
    first = docs[0][1][0] if docs[0][1] else None
    begins_with_bos = mode == "prefix" and bos is not None and first == bos
    if chunk_size is None:
        from moska.routing.policy import default_chunk_size

        chunk_size = default_chunk_size(sum(len(ids) for _, ids in docs))
    return corpus_from_token_ids(docs, mode, chunk_size, begins_with_bos)


def plan_pieces(
    sequences: Sequence[tuple[int, int]], prefill_tokens: int
) -> list[list[tuple[int, int, int]]]:
    """Split sequences into forward passes of at most ``prefill_tokens`` tokens.

    Each piece is a list of segments ``(seq_start, lo, hi)``: rows ``seq_start+lo ..
    seq_start+hi-1`` at positions ``lo..hi-1``, attending to rows ``seq_start ..
    seq_start+hi-1``. Short sequences are packed together; long ones are cut.
    """
    if prefill_tokens < 1:
        raise LibraryError(f"prefill_tokens must be positive, got {prefill_tokens}")
    pieces: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = prefill_tokens
    for start, end in sequences:
        lo = 0
        while lo < end - start:
            hi = min(end - start, lo + room)
            current.append((start, lo, hi))
            room -= hi - lo
            lo = hi
            if room == 0:
                pieces.append(current)
                current, room = [], prefill_tokens
    if current:
        pieces.append(current)
    return pieces
