"""Store hygiene through the real server: damaged libraries are listed and shown as such, a
request naming one is a 409 naming the library, no error body carries a server path, and
a second build of a name being built is refused at once."""

from __future__ import annotations

import hashlib
import json
import shutil

import httpx
import pytest

from moska.library import Manifest, ModelFingerprint, corpus_from_token_ids

pytestmark = pytest.mark.timeout(60)


def _outside_manifest(secret_digest: str) -> str:
    """A well-formed manifest whose file list points out of the library's folder."""
    corpus = corpus_from_token_ids([("a.txt", [1] * 8)], "prefix", 4)
    manifest = Manifest(
        name="kb-outside",
        created="2025-01-01T00:00:00+00:00",
        model=ModelFingerprint("x", 8, 1, 1, 1, 8, 4, "float32"),
        mode="prefix",
        chunk_size=4,
        num_tokens=8,
        position_offset=8,
        begins_with_bos=False,
        chunks=corpus.chunks,
        documents=corpus.documents,
        routing_rank=1,
        files={},
    )
    data = json.loads(manifest.to_json())
    data["files"] = {"../../secret.txt": secret_digest}
    return json.dumps(data)


@pytest.fixture
def damaged(real_server, real_engine):
    """(url, root, secret digest) with two damaged libraries planted in the server's store:
    kb-junk (unparsable manifest) and kb-outside (its manifest names ../../secret.txt)."""
    url, _ = real_server
    root = real_engine.libraries.root
    root.mkdir(parents=True, exist_ok=True)
    (root / "kb-junk").mkdir()
    (root / "kb-junk" / "manifest.json").write_text("{not json")
    secret = root.parent / "secret.txt"
    secret.write_text("not for clients")
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    (root / "kb-outside").mkdir()
    (root / "kb-outside" / "manifest.json").write_text(_outside_manifest(digest))
    yield url, root, digest
    for name in ("kb-junk", "kb-outside"):
        shutil.rmtree(root / name, ignore_errors=True)
    secret.unlink()


def _no_paths(text: str, root) -> None:
    assert str(root) not in text and str(root.parent) not in text, text


def test_damaged_libraries_are_listed_and_shown(damaged):
    url, root, digest = damaged
    r = httpx.get(f"{url}/v1/libraries")
    assert r.status_code == 200
    listed = {x["name"]: x for x in r.json()["data"]}
    assert listed["kb-junk"]["status"] == "damaged"
    assert "manifest" in listed["kb-junk"]["reason"]
    assert listed["kb-outside"]["status"] == "damaged"
    assert "../../secret.txt" in listed["kb-outside"]["reason"]
    assert all(x["status"] == "ok" for n, x in listed.items() if n not in ("kb-junk", "kb-outside"))
    _no_paths(r.text, root)
    assert digest not in r.text
    for name in ("kb-junk", "kb-outside"):
        r = httpx.get(f"{url}/v1/libraries/{name}")
        assert r.status_code == 200 and r.json()["status"] == "damaged", r.text
        assert r.json()["num_chunks"] is None and "path" not in r.json()
        _no_paths(r.text, root)
    body = {"name": "kb-junk", "documents": [{"name": "a.txt", "text": "hello"}]}
    r = httpx.post(f"{url}/v1/libraries", json=body)  # the name is taken, damaged or not
    assert r.status_code == 409 and r.json()["error"]["code"] == "library_exists", r.text


@pytest.mark.parametrize("name", ["kb-junk", "kb-outside"])
def test_request_with_a_damaged_library_is_409(damaged, model, name):
    url, root, _ = damaged
    for path, body in (
        ("completions", {"prompt": "hi"}),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ):
        r = httpx.post(
            f"{url}/v1/{path}", json={"model": model, "max_tokens": 2, "library": name, **body}
        )
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "library_damaged" and repr(name) in err["message"]
        _no_paths(r.text, root)


def test_not_found_errors_name_no_server_path(real_server, real_engine, model):
    url, _ = real_server
    root = real_engine.libraries.root
    responses = [
        httpx.get(f"{url}/v1/libraries/kb-none"),
        httpx.delete(f"{url}/v1/libraries/kb-none"),
        httpx.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": "x", "max_tokens": 2, "library": "kb-none"},
        ),
    ]
    for r in responses:
        assert r.status_code == 404, r.text
        assert "'kb-none'" in r.json()["error"]["message"]
        _no_paths(r.text, root)


def test_second_build_of_a_name_being_built_is_409_at_once(real_server, real_engine):
    url, _ = real_server
    body = {"name": "kb-busy", "documents": [{"name": "a.txt", "text": "hello " * 10}]}
    held = real_engine.libraries.reserve("kb-busy")  # a build of kb-busy is under way
    try:
        r = httpx.post(f"{url}/v1/libraries", json=body)
        assert r.status_code == 409, r.text
        assert "'kb-busy'" in r.json()["error"]["message"]
        assert "being built" in r.json()["error"]["message"]
        _no_paths(r.text, real_engine.libraries.root)
    finally:
        held.release()
    assert not any("kb-busy" in p.name for p in real_engine.libraries.root.iterdir())
