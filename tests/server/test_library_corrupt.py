"""A library whose file was altered in place (same size) through the real server (#15):
the first request is a 409 `library_damaged`, the listing then says "corrupt", a second
request is refused without hashing the files again, and a rebuild under the same name
serves again."""

from __future__ import annotations

import uuid

import httpx
import pytest

import moska.library.loaded as loaded_mod
from moska.library.format import layer_file

pytestmark = pytest.mark.timeout(60)

DOCS = [("c.txt", "Cats sit on mats. " * 2)]


def _complete(url: str, library: str) -> httpx.Response:
    body = {"model": "x", "prompt": "Where?", "max_tokens": 2, "library": library}
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    return httpx.post(f"{url}/v1/completions", json={**body, "model": model}, timeout=30)


def test_corrupt_library_is_listed_and_refused_at_once(real_server, real_engine, monkeypatch):
    url, _ = real_server
    manager = real_engine.libraries
    name = f"corrupt-{uuid.uuid4().hex[:8]}"
    manager.build(name, DOCS, chunk_size=16)
    manager.unload(name)  # the next request loads it and verifies its checksums
    path = manager.root / name / layer_file(0)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, other bytes
    hashed: list[str] = []
    real = loaded_mod.sha256_file
    monkeypatch.setattr(
        loaded_mod, "sha256_file", lambda p, *a, **k: hashed.append(p.name) or real(p, *a, **k)
    )
    try:
        assert httpx.get(f"{url}/v1/libraries/{name}").json()["status"] == "ok"
        r = _complete(url, name)
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "library_damaged" and layer_file(0) in r.text
        assert layer_file(0) in hashed

        shown = httpx.get(f"{url}/v1/libraries/{name}").json()
        listed = {x["name"]: x for x in httpx.get(f"{url}/v1/libraries").json()["data"]}
        for obj in (shown, listed[name]):
            assert obj["status"] == "corrupt", obj
            assert layer_file(0) in obj["reason"] and "rebuild" in obj["reason"]
            assert str(manager.root) not in obj["reason"]

        hashed.clear()
        r = _complete(url, name)
        assert r.status_code == 409 and r.json()["error"]["code"] == "library_damaged"
        assert hashed == []  # refused without hashing the files again

        assert httpx.delete(f"{url}/v1/libraries/{name}").status_code == 200
        manager.build(name, DOCS, chunk_size=16)  # rebuilt under the same name
        manager.unload(name)
        assert httpx.get(f"{url}/v1/libraries/{name}").json()["status"] == "ok"
        r = _complete(url, name)
        assert r.status_code == 200, r.text
        assert layer_file(0) in hashed  # the new build was verified
    finally:
        if manager.exists(name):
            httpx.delete(f"{url}/v1/libraries/{name}?wait=true")
