"""Issue 20 item 2 over HTTP: `POST /v1/libraries` takes boundary repair (`repair_tokens`,
`repair_layers`; `library/boundary_repair.py`), the library object shows it, and a bad
setting is a 400 naming the field before any job is queued."""

from __future__ import annotations

import httpx
import pytest
from conftest import wait_library_job

pytestmark = pytest.mark.timeout(60)

_DOCS = [{"name": "a.txt", "text": "The cat sat on the mat, and the dog did not. " * 4}]


def test_repair_is_built_and_shown(real_server, real_engine):
    url, _ = real_server
    body = {"name": "repair-http", "documents": _DOCS, "chunk_size": 16, "mode": "independent"}
    r = httpx.post(f"{url}/v1/libraries", json={**body, "repair_tokens": 4, "repair_layers": 2})
    assert r.status_code == 202, r.text
    job = wait_library_job(url, r.json()["id"])
    assert job["status"] == "succeeded", job
    lib = httpx.get(f"{url}/v1/libraries/repair-http").json()
    assert (lib["repair_tokens"], lib["repair_layers"]) == (4, 2)
    assert real_engine.libraries.get("repair-http").manifest.repair_tokens == 4
    assert httpx.delete(f"{url}/v1/libraries/repair-http").status_code == 200


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"repair_tokens": 4}, "repair_layers"),
        ({"repair_tokens": 4, "repair_layers": 2, "mode": "prefix"}, "repair_tokens"),
        ({"repair_tokens": 4, "repair_layers": 999}, "repair_layers"),
        ({"repair_tokens": -1, "repair_layers": 2}, "repair_tokens"),
    ],
)
def test_bad_repair_is_a_400_naming_the_field(real_server, extra, param):
    url, _ = real_server
    body = {"name": "repair-bad", "documents": _DOCS, "chunk_size": 16, "mode": "independent"}
    r = httpx.post(f"{url}/v1/libraries", json={**body, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert httpx.get(f"{url}/v1/libraries/repair-bad").status_code == 404
