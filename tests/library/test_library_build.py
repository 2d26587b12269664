"""Build, exactness, save/load, integrity checks, interrupted builds, manager."""

import itertools
import json
import os
import socket

import pytest
import torch

from moska.library import (
    ChecksumMismatchError,
    CorruptLibraryError,
    FingerprintMismatchError,
    InvalidLibraryNameError,
    LibraryExistsError,
    LibraryManager,
    LibraryNotFoundError,
    build_in_memory,
    build_library,
    load_library,
    model_fingerprint,
)
from moska.model import DenseAttention

DOCS = [
    ("a.md", "# Alpha\nThe quick brown fox jumps over the lazy dog. " * 3),
    ("b.txt", "Bravo: pack my box with five dozen liquor jugs."),
    ("c.md", "Charlie " * 20),
]


def dense_kv(model, token_ids):
    """KV of a plain single-sequence prefill (the reference)."""
    attn = DenseAttention()
    ids = torch.tensor(token_ids, dtype=torch.int64)
    with torch.inference_mode():
        model.forward(ids, torch.arange(len(ids)), attn)
    return attn.k, attn.v


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("prefill_tokens", [37, 4096])
def test_prefix_kv_equals_single_pass_prefill(tiny_model, prefill_tokens):
    lib, stats = build_in_memory(
        tiny_model, DOCS, "p", chunk_size=32, prefill_tokens=prefill_tokens, progress=False
    )
    tokens = lib.token_ids.tolist()
    tok = tiny_model.tokenizer
    # BOS once at the very start, documents separated by a newline
    assert tokens[0] == tok.bos_token_id and tokens.count(tok.bos_token_id) == 1
    assert tok.decode(tokens) == "\n".join(text for _, text in DOCS)
    k_ref, v_ref = dense_kv(tiny_model.model, tokens)
    for layer in range(lib.num_layers):
        assert rel_err(lib.k_pools[layer], k_ref[layer]) < 1e-4
        assert rel_err(lib.v_pools[layer], v_ref[layer]) < 1e-4
    assert lib.mode == "prefix" and lib.position_offset == lib.num_tokens == len(tokens)
    assert stats.num_tokens == len(tokens) and stats.tokens_per_s > 0


def test_independent_chunks_are_prefilled_alone(tiny_model):
    from moska.library.positions import IndependentOptions

    lib, _ = build_in_memory(
        tiny_model,
        DOCS,
        "i",
        chunk_size=24,
        mode="independent",
        prefill_tokens=50,
        progress=False,
        independent=IndependentOptions(chunk_sink=False),  # chunk_sink: test_independent_context
    )
    assert lib.position_offset == 24
    offs = lib.chunk_offsets.tolist()
    for c in lib.chunks:
        assert c.pos_start == 0 and c.end - c.start <= 24
        doc = lib.manifest.documents[c.document]
        assert doc.start <= c.start and c.end <= doc.end  # never spans documents
        k_ref, v_ref = dense_kv(tiny_model.model, lib.token_ids[c.start : c.end].tolist())
        for layer in range(lib.num_layers):
            assert (
                rel_err(lib.k_pools[layer][offs[c.chunk] : offs[c.chunk + 1]], k_ref[layer]) < 1e-4
            )
            assert rel_err(lib.v_pools[layer][c.start : c.end], v_ref[layer]) < 1e-4
    assert lib.token_ids[0] != tiny_model.tokenizer.bos_token_id


@pytest.mark.parametrize("mode", ["prefix", "independent"])
def test_chunk_table_covers_all_tokens_and_round_trips(tiny_model, tmp_path, mode):
    info = build_library(
        tiny_model,
        DOCS,
        "lib",
        tmp_path,
        chunk_size=16,
        mode=mode,
        prefill_tokens=40,
        progress=False,
    )
    assert info.compatible and info.build.tokens_per_s > 0 and info.size_bytes > 0
    lib = load_library(tmp_path, "lib", model_fingerprint(tiny_model), progress=False)
    offs = lib.chunk_offsets.tolist()
    assert offs[0] == 0 and offs[-1] == lib.num_tokens == info.num_tokens
    assert all(b > a for a, b in itertools.pairwise(offs)) and len(offs) == info.num_chunks + 1
    assert sum(d.num_tokens for d in lib.manifest.documents) == lib.num_tokens
    mem, _ = build_in_memory(
        tiny_model, DOCS, "lib", chunk_size=16, mode=mode, prefill_tokens=40, progress=False
    )
    assert torch.equal(mem.token_ids, lib.token_ids)
    for layer in range(lib.num_layers):
        assert torch.equal(mem.k_pools[layer], lib.k_pools[layer])
        assert torch.equal(mem.v_pools[layer], lib.v_pools[layer])
        for a, b in zip(mem.routing[layer], lib.routing[layer]):
            assert torch.equal(a, b)
    assert lib.routing[0].rank == info.routing_rank


@pytest.fixture
def saved(tiny_model, tmp_path):
    build_library(tiny_model, DOCS[:2], "lib", tmp_path, chunk_size=32, progress=False)
    return tmp_path


def test_fingerprint_mismatch(saved, other_model):
    with pytest.raises(FingerprintMismatchError, match="weights_hash") as e:
        load_library(saved, "lib", model_fingerprint(other_model), progress=False)
    assert "built for model" in str(e.value) and "rebuild" in str(e.value)
    mgr = LibraryManager(saved, other_model)
    assert mgr.list()[0].compatible is False
    with pytest.raises(FingerprintMismatchError):
        mgr.get("lib")
    assert mgr.loaded_names() == []


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_damaged_file_is_named_and_nothing_loads(saved, tiny_model, damage):
    f = saved / "lib" / "layer_001.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    mgr = LibraryManager(saved, tiny_model, progress=False)
    with pytest.raises(ChecksumMismatchError, match="layer_001.safetensors") as e:
        mgr.get("lib")
    assert isinstance(e.value, CorruptLibraryError) and "rm" in str(e.value)
    assert mgr.loaded_names() == []


def test_missing_file_and_bad_manifest(saved, tiny_model):
    (saved / "lib" / "tokens.safetensors").unlink()
    with pytest.raises(CorruptLibraryError, match="tokens.safetensors"):
        load_library(saved, "lib", None, progress=False)
    (saved / "lib" / "manifest.json").write_text("{")
    with pytest.raises(CorruptLibraryError, match="manifest"):
        load_library(saved, "lib", None, progress=False)
    (listed,) = LibraryManager(saved, tiny_model).list()  # damaged: listed as such by ls
    assert (listed.name, listed.status) == ("lib", "damaged") and "manifest" in listed.reason


def test_interrupted_build_leaves_no_library(tiny_model, tmp_path, monkeypatch):
    from moska.library import store

    def boom(*a, **k):
        raise KeyboardInterrupt("power cut")

    real = store.write_durable
    calls = []

    def flaky(path, data):
        calls.append(path)
        if len(calls) == 2:  # after the first file, mid-build
            boom()
        real(path, data)

    monkeypatch.setattr(store, "write_durable", flaky)
    mgr = LibraryManager(tmp_path, tiny_model, progress=False)
    with pytest.raises(KeyboardInterrupt):
        mgr.build("lib", DOCS, chunk_size=32)
    assert mgr.list() == [] and not mgr.exists("lib")
    assert list(tmp_path.iterdir()) == []  # the tmp dir was removed too


def test_stale_tmp_dir_is_ignored_and_cleaned(saved, tiny_model):
    stale = saved / ".x.tmp-dead"
    stale.mkdir()
    (stale / "BUILDING").write_text(
        json.dumps({"pid": 999999999, "host": socket.gethostname(), "started": 0})
    )
    (stale / "manifest.json").write_text("{}")
    live = saved / ".y.tmp-live"
    live.mkdir()
    (live / "BUILDING").write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": 0})
    )
    mgr = LibraryManager(saved, tiny_model)
    assert [i.name for i in mgr.list()] == ["lib"]
    assert not stale.exists() and live.exists()


def test_manager_build_get_delete(tiny_model, tmp_path):
    mgr = LibraryManager(tmp_path, tiny_model, progress=False)
    info = mgr.build("docs", DOCS, chunk_size=32, mode="independent")
    assert info.mode == "independent" and info.position_offset == 32 + info.chunk_sink
    assert mgr.loaded_names() == ["docs"] and mgr.get("docs") is mgr.get("docs")
    with pytest.raises(LibraryExistsError):
        mgr.build("docs", DOCS)
    assert mgr.info("docs").num_chunks == info.num_chunks
    mgr.unload("docs")
    lib = mgr.get("docs")  # loads from disk, verified
    assert lib.num_chunks == info.num_chunks and mgr.loaded_names() == ["docs"]
    mgr.delete("docs")
    assert mgr.loaded_names() == [] and mgr.list() == [] and list(tmp_path.iterdir()) == []
    for call in (mgr.get, mgr.info, mgr.delete):
        with pytest.raises(LibraryNotFoundError):
            call("docs")
    for bad in ("../etc", ".x", "a/b"):
        with pytest.raises(InvalidLibraryNameError):
            mgr.build(bad, DOCS)
        with pytest.raises(InvalidLibraryNameError):
            mgr.get(bad)


def test_listing_needs_no_model(saved):
    mgr = LibraryManager(saved, None)
    (info,) = mgr.list()
    assert info.name == "lib" and info.compatible is None and info.num_documents == 2
    assert mgr.get("lib").num_tokens == info.num_tokens  # no fingerprint check without a model


def test_default_root_follows_moska_home(monkeypatch, tmp_path):
    from moska.library import default_library_root

    monkeypatch.setenv("MOSKA_HOME", str(tmp_path))
    assert default_library_root() == tmp_path / "libraries"
    assert LibraryManager().root == tmp_path / "libraries"


def test_token_id_documents_are_taken_verbatim(tiny_model, tmp_path):
    ids = list(range(10, 50))
    info = build_library(tiny_model, [("ids", ids)], "t", tmp_path, chunk_size=16, progress=False)
    lib = load_library(tmp_path, "t", model_fingerprint(tiny_model), progress=False)
    assert lib.token_ids.tolist() == ids and info.num_chunks == 3


def test_demo_library_is_built_once(tiny_model, tmp_path, monkeypatch):
    from moska.library import demo

    monkeypatch.setattr(demo, "demo_documents", lambda: [("d.md", "moska demo " * 5)])
    mgr = LibraryManager(tmp_path, tiny_model, progress=False)
    first = demo.ensure_demo_library(mgr)
    assert first.name == "demo" and first.compatible
    assert demo.ensure_demo_library(mgr).created == first.created
