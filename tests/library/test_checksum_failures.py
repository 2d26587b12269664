"""A build whose files fail their checksums on a load is remembered (#15): listed
"corrupt" (also by another process, as `moska library ls`), later loads fail at once without
hashing the files again, until the library is rebuilt or its files change."""

from __future__ import annotations

import os

import pytest

import moska.library.loaded as loaded_mod
from moska.library.checksum_failures import FAILURE_FILE
from moska.library.errors import ChecksumMismatchError
from moska.library.format import layer_file
from moska.library.manager import LibraryManager

DOCS = [("a.txt", "The cat sat on the mat. " * 3), ("b.txt", "Dogs bark at night. " * 3)]


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """The names of the files verify_files hashes, in order (the real hash still runs)."""
    seen: list[str] = []
    real = loaded_mod.sha256_file

    def counting(path, *args, **kwargs):
        seen.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loaded_mod, "sha256_file", counting)
    return seen


def _built(manager: LibraryManager, name: str) -> bytes:
    """Build ``name``, unload it (the next get loads and verifies it) and alter one byte of
    its first layer file in place, keeping its size; return the file's original bytes."""
    manager.build(name, DOCS, chunk_size=32)
    manager.unload(name)
    path = manager.root / name / layer_file(0)
    original = path.read_bytes()
    altered = bytearray(original)
    altered[-1] ^= 0xFF
    path.write_bytes(bytes(altered))
    assert path.stat().st_size == len(original)
    return original


def test_corrupt_build_is_listed_and_refused_without_rehashing(tiny_model, tmp_path, hashes):
    manager = LibraryManager(tmp_path, tiny_model, progress=False)
    _built(manager, "kb")
    assert manager.info("kb").status == "ok"  # checksums are checked on load only
    with pytest.raises(ChecksumMismatchError, match=layer_file(0)):
        manager.get("kb")
    assert layer_file(0) in hashes  # the first load hashed the files

    for info in (manager.info("kb"), *manager.list()):
        assert info.status == "corrupt", info
        assert layer_file(0) in info.reason and "rebuild" in info.reason
        assert info.num_tokens is not None  # the manifest's fields are kept
    # another process (`moska library ls`) sees it through the record in the folder
    other = LibraryManager(tmp_path, None, progress=False)
    assert [(i.name, i.status) for i in other.list()] == [("kb", "corrupt")]

    hashes.clear()
    with pytest.raises(ChecksumMismatchError, match="not hashed again"):
        manager.acquire("kb")
    assert hashes == []  # refused at once
    assert manager.num_users("kb") == 0

    manager.delete("kb")  # rebuild under the same name: a new build id, nothing remembered
    manager.build("kb", DOCS, chunk_size=32)
    manager.unload("kb")
    assert manager.info("kb").status == "ok"
    library = manager.acquire("kb")
    assert layer_file(0) in hashes  # verified afresh
    manager.release(library)
    assert not (tmp_path / "kb" / FAILURE_FILE).exists()


def test_a_changed_file_is_verified_again(tiny_model, tmp_path, hashes):
    manager = LibraryManager(tmp_path, tiny_model, progress=False)
    original = _built(manager, "kb2")
    with pytest.raises(ChecksumMismatchError):
        manager.get("kb2")
    assert manager.info("kb2").status == "corrupt"
    path = tmp_path / "kb2" / layer_file(0)
    mtime = path.stat().st_mtime_ns
    path.write_bytes(original)  # restored
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a new mtime, on coarse clocks too
    assert manager.info("kb2").status == "ok"
    hashes.clear()
    assert manager.get("kb2").name == "kb2"
    assert layer_file(0) in hashes
    assert not (tmp_path / "kb2" / FAILURE_FILE).exists()  # the stale record is gone


def test_a_read_only_record_is_kept_in_memory(tiny_model, tmp_path, hashes, monkeypatch):
    manager = LibraryManager(tmp_path, tiny_model, progress=False)
    _built(manager, "kb3")

    def refuse(*args, **kwargs):
        raise PermissionError("read-only store")

    monkeypatch.setattr("moska.library.checksum_failures.os.replace", refuse)
    with pytest.raises(ChecksumMismatchError):
        manager.get("kb3")
    assert not (tmp_path / "kb3" / FAILURE_FILE).exists()
    assert not [p for p in (tmp_path / "kb3").iterdir() if p.name.startswith(".")]
    assert manager.info("kb3").status == "corrupt"
    hashes.clear()
    with pytest.raises(ChecksumMismatchError):
        manager.get("kb3")
    assert hashes == []
