"""Store hygiene: manifest file names stay inside the library folder, errors name no server
path, damaged libraries are listed as such, one build per name at a time, and the chunk ->
(document, token span) lookup that routing reports use."""

from __future__ import annotations

import builtins
import hashlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from moska.library import (
    ChecksumMismatchError,
    CorruptLibraryError,
    LibraryBusyError,
    LibraryExistsError,
    LibraryManager,
    LibraryNotFoundError,
    Manifest,
    build_library,
    corpus_from_token_ids,
    load_library,
    model_fingerprint,
)
from moska.library import builder as builder_module
from moska.library import format as format_module
from moska.library.format import tmp_dir_name, validate_file_name
from moska.library.store import LOCK_TOKEN

DOCS = [
    ("a.md", "# Alpha\nThe quick brown fox jumps over the lazy dog. " * 3),
    ("b.txt", "Bravo: pack my box with five dozen liquor jugs."),
    ("c.md", "Charlie " * 20),
]


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory) -> Path:
    """A library "lib" built once; tests copy it (see ``store``)."""
    root = tmp_path_factory.mktemp("built")
    build_library(tiny_model, DOCS, "lib", root, chunk_size=32, progress=False)
    return root / "lib"


@pytest.fixture
def store(built, tmp_path) -> Path:
    """``tmp_path/store`` holding a fresh copy of the library "lib"."""
    root = tmp_path / "store"
    shutil.copytree(built, root / "lib")
    return root


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------- file names


@pytest.mark.parametrize("fname", ["layer_000.safetensors", "tokens.safetensors", "x-1_a.bin"])
def test_plain_file_names_are_valid(fname):
    assert validate_file_name(fname) == fname


@pytest.mark.parametrize(
    "fname", ["../../x", "..", "../x", "/etc/passwd", "a/b", "a\\b", ".hidden", "", "a\0b", 3]
)
def test_file_names_that_leave_the_folder_are_refused(fname):
    with pytest.raises(ValueError, match="not a plain name"):
        validate_file_name(fname)


class _Opened:
    """Records every path the process opens through Python while installed."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[Path] = []
        real_open = builtins.open

        def spy_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)):
                self.paths.append(Path(file).resolve())
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", spy_open)
        monkeypatch.setattr(io, "open", spy_open)  # pathlib opens through io.open
        real_sha = format_module.sha256_file

        def spy_sha(path, *args, **kwargs):
            self.paths.append(Path(path).resolve())
            return real_sha(path, *args, **kwargs)

        monkeypatch.setattr(format_module, "sha256_file", spy_sha)
        monkeypatch.setattr("moska.library.loaded.sha256_file", spy_sha)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_manifest_pointing_outside_is_damaged_and_never_read(store, tiny_model, monkeypatch, how):
    secret = store.parent / "secret.txt"  # lib/../../secret.txt
    secret.write_text("not yours")
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    lib = store / "lib"
    if how == "symlink":
        (lib / "extra.bin").symlink_to(secret)
        entry = "extra.bin"
    else:
        entry = "../../secret.txt" if how == "dotdot" else str(secret)
    _edit_manifest(lib, lambda m: m["files"].__setitem__(entry, digest))

    opened = _Opened(monkeypatch)
    with pytest.raises(CorruptLibraryError) as e:
        load_library(store, "lib", model_fingerprint(tiny_model), progress=False)
    assert "'lib' is damaged" in str(e.value) and str(store) not in str(e.value)
    mgr = LibraryManager(store, tiny_model, progress=False)
    (info,) = mgr.list()
    assert info.status == "damaged" and info.num_chunks is None
    assert mgr.info("lib").status == "damaged"
    with pytest.raises(CorruptLibraryError):
        mgr.get("lib")
    assert secret.resolve() not in opened.paths
    assert opened.paths  # the spy saw the manifest being read: it was really installed
    assert digest not in str(e.value) and digest not in info.reason


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.__setitem__("files", ["tokens.safetensors"]),
        lambda m: m.__setitem__("files", {"tokens.safetensors": 3}),
        lambda m: m.__setitem__("model", "llama"),
        lambda m: m.__setitem__("chunks", [1, 2]),
        lambda m: m.__setitem__("num_tokens", "many"),
        lambda m: m.__setitem__("documents", [{"name": "a"}]),
        lambda m: m.clear(),
    ],
)
def test_malformed_manifests_are_damaged_not_crashes(store, tiny_model, edit):
    _edit_manifest(store / "lib", edit)
    mgr = LibraryManager(store, tiny_model, progress=False)
    (info,) = mgr.list()
    assert info.status == "damaged" and info.reason.startswith("manifest.json: unreadable")
    with pytest.raises(CorruptLibraryError):
        mgr.get("lib")


# ---------------------------------------------------------------- messages


def test_error_messages_name_the_library_not_the_store(store, tiny_model):
    mgr = LibraryManager(store, tiny_model, progress=False)
    messages = []
    for call in (mgr.get, mgr.info):
        with pytest.raises(LibraryNotFoundError) as e:
            call("nope")
        messages.append(str(e.value))
    with pytest.raises(LibraryExistsError) as e:
        mgr.build("lib", DOCS, chunk_size=32)
    messages.append(str(e.value))

    layer = store / "lib" / "layer_001.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError) as e:
        mgr.get("lib")
    assert e.value.file == "layer_001.safetensors"
    messages.append(str(e.value))

    (store / "lib" / "manifest.json").chmod(0)
    try:
        if not os.access(store / "lib" / "manifest.json", os.R_OK):  # (root reads anyway)
            with pytest.raises(CorruptLibraryError, match="Permission denied") as e:
                mgr.get("lib")
            messages.append(str(e.value))
    finally:
        (store / "lib" / "manifest.json").chmod(0o644)

    for m in messages:
        assert "'nope'" in m or "'lib'" in m, m
        assert str(store.parent) not in m and "/" not in m.split("`")[0], m


# ---------------------------------------------------------------- damaged listing


def test_damaged_libraries_are_listed_with_a_reason(store, built, tiny_model):
    shutil.copytree(built, store / "gone")
    _edit_manifest(store / "gone", lambda m: m.__setitem__("name", "gone"))
    (store / "gone" / "tokens.safetensors").unlink()
    (store / "empty").mkdir()  # no manifest at all
    (store / "junk").mkdir()
    (store / "junk" / "manifest.json").write_text("{not json")
    mgr = LibraryManager(store, tiny_model, progress=False)
    listed = {i.name: i for i in mgr.list()}
    assert set(listed) == {"empty", "gone", "junk", "lib"}
    assert listed["lib"].status == "ok" and listed["lib"].reason is None
    assert listed["lib"].compatible is True
    assert "tokens.safetensors" in listed["gone"].reason and "missing" in listed["gone"].reason
    assert "manifest missing" in listed["empty"].reason
    assert "unreadable manifest" in listed["junk"].reason
    for name in ("empty", "gone", "junk"):
        assert listed[name].status == "damaged" and mgr.info(name) == listed[name]
        assert str(store) not in listed[name].reason
        mgr.delete(name)  # a damaged library can be removed
    assert [i.name for i in mgr.list()] == ["lib"]


def test_cli_ls_and_info_show_damaged_libraries(store, capsys):
    from moska.cli import main

    (store / "junk").mkdir()
    (store / "junk" / "manifest.json").write_text("[]")
    assert main(["library", "ls", "--library-root", str(store)]) == 0
    lines = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["junk"].startswith("damaged: manifest.json: unreadable manifest")
    assert "tokens" in lines["lib"] and "chunks" in lines["lib"]
    assert main(["library", "info", "junk", "--library-root", str(store)]) == 0
    out = capsys.readouterr().out
    assert "status: damaged" in out and "reason: manifest.json" in out and "None" not in out


# ---------------------------------------------------------------- build reservation


def test_second_build_of_a_name_fails_before_its_prefill(tiny_model, tmp_path, monkeypatch):
    mgr = LibraryManager(tmp_path, tiny_model, progress=False)
    prefills = []
    real = builder_module.build_in_memory
    monkeypatch.setattr(
        builder_module, "build_in_memory", lambda *a, **k: prefills.append(a[2]) or real(*a, **k)
    )
    held = mgr.reserve("x")
    with pytest.raises(LibraryBusyError, match="being built"):
        mgr.build("x", DOCS, chunk_size=32)
    with pytest.raises(LibraryBusyError):
        LibraryManager(tmp_path, tiny_model).reserve("x")  # another manager, same store
    assert prefills == [] and [i.name for i in mgr.list()] == []  # hidden while building
    info = mgr.build("x", DOCS, chunk_size=32, reservation=held)
    assert info.status == "ok" and prefills == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # lock released
    with pytest.raises(LibraryExistsError):
        mgr.reserve("x")


def test_reservation_is_released_on_failure_and_cancel(tiny_model, tmp_path, monkeypatch):
    mgr = LibraryManager(tmp_path, tiny_model, progress=False)

    def fail(*a, **k):
        raise RuntimeError("prefill failed")

    monkeypatch.setattr(builder_module, "build_in_memory", fail)
    with pytest.raises(RuntimeError):
        mgr.build("y", DOCS)
    mgr.reserve("y").release()  # free again after the failure
    job = mgr.reserve("y")
    job.release()  # a job cancelled before it started gives the name back
    job.release()  # idempotent
    mgr.reserve("y").release()
    assert list(tmp_path.iterdir()) == []


def test_only_one_of_many_threads_reserves_a_name(tmp_path):
    mgr = LibraryManager(tmp_path, None)
    barrier = threading.Barrier(8)
    results: list[object] = []

    def race() -> None:
        barrier.wait()
        try:
            results.append(mgr.reserve("z"))
        except LibraryBusyError as e:
            results.append(e)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if not isinstance(r, LibraryBusyError)]
    assert len(results) == 8 and len(winners) == 1
    winners[0].release()


# What a build in another process leaves while it runs (see store.BuildLock), written
# without importing moska so the child starts in milliseconds.
_HOLDER = """
import json, os, socket, sys, time
os.mkdir(sys.argv[1])
owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
with open(os.path.join(sys.argv[1], "BUILDING"), "w") as f:
    json.dump(owner, f)
print("held", flush=True)
sys.stdin.readline()
"""


def test_reservation_across_processes_and_stale_after_owner_dies(tmp_path):
    lock = tmp_path / tmp_dir_name("w", LOCK_TOKEN)
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        mgr = LibraryManager(tmp_path, None)
        with pytest.raises(LibraryBusyError):
            mgr.reserve("w")
        child.kill()  # dies holding the lock
        child.wait(timeout=30)
        mgr.reserve("w").release()  # the dead owner's lock is stale: taken over
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)


# ---------------------------------------------------------------- chunk spans


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


def test_loaded_library_chunk_spans_and_old_manifests(store, tiny_model):
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

    _edit_manifest(store / "lib", strip)
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


def test_a_damaged_demo_library_is_rebuilt(tiny_model, tmp_path, monkeypatch):
    from moska.library import demo

    monkeypatch.setattr(demo, "demo_documents", lambda: [("d.md", "moska demo " * 5)])
    mgr = LibraryManager(tmp_path, tiny_model, progress=False)
    demo.ensure_demo_library(mgr, chunk_size=16)
    mgr.unload("demo")
    (tmp_path / "demo" / "tokens.safetensors").unlink()
    assert mgr.info("demo").status == "damaged"
    rebuilt = demo.ensure_demo_library(mgr, chunk_size=16)
    assert rebuilt.status == "ok" and mgr.info("demo").status == "ok"
    assert mgr.get("demo").num_tokens == rebuilt.num_tokens
