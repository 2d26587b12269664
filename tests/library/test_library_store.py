"""Store hygiene: manifest file names stay inside the library folder, errors name no server
path, damaged libraries are listed as such (and the demo library rebuilt). Build
reservations: test_library_reservation.py; chunk spans: test_chunk_spans.py."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import shutil
from pathlib import Path

import pytest

from moska.library import (
    ChecksumMismatchError,
    CorruptLibraryError,
    LibraryExistsError,
    LibraryManager,
    LibraryNotFoundError,
    load_library,
    model_fingerprint,
)
from moska.library import format as format_module
from moska.library.format import validate_file_name

DOCS = [
    ("a.md", "# Alpha\nThe quick brown fox jumps over the lazy dog. " * 3),
    ("b.txt", "Bravo: pack my box with five dozen liquor jugs."),
    ("c.md", "Charlie " * 20),
]


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
def test_manifest_pointing_outside_is_damaged_and_never_read(
    store, tiny_model, monkeypatch, how, edit_manifest
):
    secret = store.parent / "secret.txt"  # lib/../../secret.txt
    secret.write_text("not yours")
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    lib = store / "lib"
    if how == "symlink":
        (lib / "extra.bin").symlink_to(secret)
        entry = "extra.bin"
    else:
        entry = "../../secret.txt" if how == "dotdot" else str(secret)
    edit_manifest(lib, lambda m: m["files"].__setitem__(entry, digest))

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
def test_malformed_manifests_are_damaged_not_crashes(store, tiny_model, edit, edit_manifest):
    edit_manifest(store / "lib", edit)
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


def test_damaged_libraries_are_listed_with_a_reason(store, built, tiny_model, edit_manifest):
    shutil.copytree(built, store / "gone")
    edit_manifest(store / "gone", lambda m: m.__setitem__("name", "gone"))
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


def test_status_is_an_enum_that_serializes_as_its_value(store, tiny_model, edit_manifest):
    import dataclasses
    import json

    from moska.library.info import LibraryStatus

    mgr = LibraryManager(store, tiny_model)
    ok = mgr.info("lib")
    assert ok.status is LibraryStatus.OK
    edit_manifest(store / "lib", lambda m: m.__setitem__("chunks", "nope"))
    bad = mgr.info("lib")
    assert bad.status is LibraryStatus.DAMAGED
    sent = json.loads(json.dumps(dataclasses.asdict(bad)))  # what GET /v1/libraries sends
    assert sent["status"] == "damaged" and f"{ok.status}" == "ok"
