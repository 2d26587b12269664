import dataclasses

import pytest

from moska.library import (
    InvalidLibraryNameError,
    Manifest,
    ModelFingerprint,
    corpus_from_token_ids,
)
from moska.library.chunking import plan_pieces
from moska.library.format import is_tmp_dir, tmp_dir_name, validate_name

FP = ModelFingerprint("LlamaForCausalLM", 64, 2, 4, 2, 16, 261, "float32", "abc")


@pytest.mark.parametrize("name", ["a", "Docs_v1.2-x", "0" * 64])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-x", "a/b", "../x", "a\\b", "x" * 65, "sp ace", "é", None, 3]
)
def test_invalid_names(name):
    with pytest.raises(InvalidLibraryNameError, match="invalid library name"):
        validate_name(name)
    assert issubclass(InvalidLibraryNameError, ValueError)


def test_tmp_dir_names_are_hidden_and_never_valid():
    t = tmp_dir_name("lib", "123")
    assert is_tmp_dir(t) and t.startswith(".")
    with pytest.raises(InvalidLibraryNameError):
        validate_name(t)


def test_prefix_chunks_tile_stream_and_may_span_documents():
    c = corpus_from_token_ids([("a", [1] * 10), ("b", [2] * 7)], "prefix", 4)
    assert c.chunk_offsets == [0, 4, 8, 12, 16, 17]
    assert [ch.pos_start for ch in c.chunks] == [0, 4, 8, 12, 16]
    assert [ch.document for ch in c.chunks] == [0, 0, 0, 1, 1]
    assert c.position_offset == 17 and c.sequences == [(0, 17)]


def test_independent_chunks_never_span_documents():
    c = corpus_from_token_ids([("a", [1] * 10), ("b", [2] * 7)], "independent", 4)
    assert c.chunk_offsets == [0, 4, 8, 10, 14, 17]
    assert all(ch.pos_start == 0 for ch in c.chunks)
    assert [ch.document for ch in c.chunks] == [0, 0, 0, 1, 1]
    assert c.position_offset == 4
    assert c.sequences == [(0, 4), (4, 8), (8, 10), (10, 14), (14, 17)]


@pytest.mark.parametrize("budget", [1, 3, 4, 5, 100])
def test_plan_pieces_cover_every_row_once_within_budget(budget):
    seqs = [(0, 4), (4, 8), (8, 10), (10, 14), (14, 17)]
    pieces = plan_pieces(seqs, budget)
    rows = [s + i for piece in pieces for s, lo, hi in piece for i in range(lo, hi)]
    assert rows == list(range(17))
    assert all(sum(hi - lo for _, lo, hi in p) <= budget for p in pieces)
    for piece in pieces:  # a segment continues its sequence where the previous one stopped
        for s, lo, hi in piece:
            assert (s, s + hi) in [(a, b) for a, b in seqs] or hi < dict(seqs)[s] - s


def test_manifest_json_round_trip():
    c = corpus_from_token_ids([("a", [1] * 10), ("b", [2] * 7)], "prefix", 4)
    m = Manifest(
        "lib",
        "2026-01-01T00:00:00+00:00",
        FP,
        "prefix",
        4,
        17,
        17,
        False,
        c.chunks,
        c.documents,
        4,
        {"layer_000.safetensors": "00"},
    )
    m2 = Manifest.from_json(m.to_json())
    assert m2 == m
    with pytest.raises(ValueError, match="format version"):
        Manifest.from_json(m.to_json().replace('"format_version": 1', '"format_version": 99'))


def test_fingerprint_mismatch_fields_and_description():
    other = dataclasses.replace(FP, num_layers=3, dtype="bfloat16")
    assert FP.mismatches(other) == ["num_layers", "dtype"]
    assert FP.mismatches(FP) == []
    assert "layers=2" in FP.describe()
