"""A library request through P/D: the prefill instance computes the request's own KV
behind the library (namespaced by the library build), the decode instance takes those
blocks and continues; the output equals one colocated instance's."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.timeout(180)  # the session fixture starts processes


def test_library_prompt_through_pd(pd_cluster):
    url, urls, apps, _ = pd_cluster
    engines = {n: a.state.moska.engine for n, a in apps.items()}
    manager = engines["prefill0"].libraries
    if not manager.exists("pdlib"):
        text = "moska shares a library's KV between requests. " * 6
        manager.build("pdlib", [("doc", text)], chunk_size=64)
    for name in ("decode0", "decode1"):  # the same store, the same build id
        assert engines[name].libraries.get("pdlib").build_id == manager.get("pdlib").build_id
    body = {"model": "moska-tiny", "prompt": "what does moska share? " * 3, "max_tokens": 6,
            "temperature": 0, "ignore_eos": True, "library": "pdlib"}  # fmt: skip
    before = {n: e.stats().prompt_tokens_computed for n, e in engines.items()}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    computed = {n: e.stats().prompt_tokens_computed - before[n] for n, e in engines.items()}
    n = r.json()["usage"]["prompt_tokens"]
    tail = n - (n - 1) // 16 * 16
    assert computed["prefill0"] == n and n > 16
    assert sorted([computed["decode0"], computed["decode1"]]) == [0, tail]
    colocated = httpx.post(f"{urls['prefill0']}/v1/completions", json=body, timeout=60)
    assert r.json()["choices"][0]["text"] == colocated.json()["choices"][0]["text"]
