"""The chunk -> (document, token span) lookup that routing reports use, from a manifest, a
loaded library, and a manifest written before chunks and documents carried spans."""

from __future__ import annotations

import itertools
import json

import pytest

from moska.library import (
    LibraryManager,
    Manifest,
    corpus_from_token_ids,
    load_library,
    model_fingerprint,
)
from moska.library import format as format_module


def _manifest(corpus, files: dict[str, str] | None = None) -> Manifest:
    return Manifest(
        name="m",
        created="now",
        model=format_module.ModelFingerprint("x", 8, 1, 1, 1, 8, 4, "float32"),
        mode=corpus.mode,
        chunk_size=corpus.chunk_size,
        num_tokens=corpus.num_tokens,
        position_offset=corpus.position_offset,
        begins_with_bos=False,
        chunks=corpus.chunks,
        documents=corpus.documents,
        routing_rank=1,
        files=files or {},
    )


@pytest.mark.parametrize("mode", ["prefix", "independent"])
def test_chunk_span_names_the_document_the_chunk_starts_in(mode):
    docs = [("a", [1] * 10), ("b", [2] * 7), ("c", [3] * 3)]
    manifest = _manifest(corpus_from_token_ids(docs, mode, 4))
    bounds = [("a", 0, 10), ("b", 10, 17), ("c", 17, 20)]
    spans = [manifest.chunk_span(c) for c in range(manifest.num_chunks)]
    assert [s.chunk for s in spans] == list(range(len(spans)))
    assert spans[0].start == 0 and spans[-1].end == 20
    for s, nxt in itertools.pairwise(spans):
        assert s.end == nxt.start and 0 < s.end - s.start <= 4
    for s in spans:
        (doc,) = [n for n, lo, hi in bounds if lo <= s.start < hi]
        assert s.document == doc
    with pytest.raises(IndexError):
        manifest.chunk_span(len(spans))


def test_loaded_library_chunk_spans_and_old_manifests(store, tiny_model, edit_manifest):
    fp = model_fingerprint(tiny_model)
    lib = load_library(store, "lib", fp, progress=False)
    docs = lib.manifest.documents
    assert [d.name for d in docs] == ["a.md", "b.txt", "c.md"]
    for c in lib.chunks:
        span = lib.chunk_span(c.chunk)
        assert (span.start, span.end) == (c.start, c.end)
        assert [d.name for d in docs if d.start <= span.start < d.end] == [span.document]

    def strip(m):  # a manifest written before chunks and documents carried spans
        del m["documents"]
        for c in m["chunks"]:
            del c["document"]

    edit_manifest(store / "lib", strip)
    old = load_library(store, "lib", fp, progress=False)
    assert old.manifest.documents == () and old.num_chunks == lib.num_chunks
    span = old.chunk_span(1)
    assert span.document is None and (span.start, span.end) == lib.chunk_span(1)[2:]
    assert LibraryManager(store, tiny_model).info("lib").status == "ok"


def test_manifest_json_round_trips_document_spans():
    corpus = corpus_from_token_ids([("a", [1] * 5), ("b", [2] * 5)], "prefix", 3)
    m = _manifest(corpus, {"tokens.safetensors": "0" * 64})
    back = Manifest.from_json(m.to_json())
    assert back == m and back.chunk_span(1).document == "a" and back.chunk_span(2).document == "b"
    bad = json.loads(m.to_json())
    bad["files"] = {"../x": "0" * 64}
    with pytest.raises(ValueError, match="not a plain name"):
        Manifest.from_json(json.dumps(bad))
