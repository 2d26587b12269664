"""Issue 17 over HTTP: `POST /v1/libraries` takes the routing index's rank (`routing_rank`,
a 400 naming it beyond the model's head_dim) and, without `chunk_size`, cuts the library
to scale as `moska library build` does (not one 4,096-token chunk)."""

from __future__ import annotations

import httpx
import pytest
from conftest import wait_library_job

from moska.routing.policy import default_chunk_size

pytestmark = pytest.mark.timeout(60)

_DOCS = [{"name": "a.txt", "text": "The cat sat on the mat, and the dog did not. " * 6}]


def _build(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/libraries", json=body)
    assert r.status_code == 202, r.text
    return wait_library_job(url, r.json()["id"])


def test_routing_rank_and_the_scaled_chunk_size(real_server, real_engine):
    url, _ = real_server
    head_dim = real_engine.loaded.config.head_dim
    job = _build(url, {"name": "rank-http", "documents": _DOCS, "routing_rank": 8})
    assert job["status"] == "succeeded", job
    lib = httpx.get(f"{url}/v1/libraries/rank-http").json()
    assert lib["routing_rank"] == 8 != head_dim // 4
    assert lib["chunk_size"] == default_chunk_size(lib["num_tokens"]) < lib["num_tokens"]
    assert lib["num_chunks"] > 1
    assert real_engine.libraries.get("rank-http").routing[0].rank == 8
    r = httpx.post(
        f"{url}/v1/libraries",
        json={"name": "rank-big", "documents": _DOCS, "routing_rank": head_dim + 1},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "routing_rank"
    assert httpx.delete(f"{url}/v1/libraries/rank-http").status_code == 200
