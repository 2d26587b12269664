"""P/D output equals one colocated instance's, token for token (greedy), and the decode
instance really took the prompt's blocks from the transfer instead of computing them."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.timeout(180)  # the session fixture starts processes


def _complete(url, body, headers=None):
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("words", [1, 9, 23])
def test_completion_matches_colocated(pd_cluster, words):
    url, urls, _, _ = pd_cluster
    body = {"model": "moska-tiny", "prompt": "shared prefix " * words + "tail",
            "max_tokens": 10, "temperature": 0, "ignore_eos": True}  # fmt: skip
    via_pd = _complete(url, body)
    colocated = _complete(urls["prefill0"], body)
    assert via_pd["choices"][0]["text"] == colocated["choices"][0]["text"]
    assert via_pd["usage"]["completion_tokens"] == 10


def test_decode_takes_transferred_blocks(pd_cluster):
    url, urls, apps, _ = pd_cluster
    ids = list(range(5, 5 + 70))  # 4 full blocks of 16 before the last token
    body = {"model": "moska-tiny", "prompt": ids, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    before = {n: apps[n].state.moska.engine.stats().prompt_tokens_computed for n in apps}
    via_pd = _complete(url, body)
    after = {n: apps[n].state.moska.engine.stats().prompt_tokens_computed for n in apps}
    computed = {n: after[n] - before[n] for n in apps}
    # the prefill computed the whole prompt; one decode instance only its tail (6 tokens)
    assert computed["prefill0"] == 70
    assert sorted([computed["decode0"], computed["decode1"]]) == [0, 70 - 64]
    # one host: the blocks went through the shared-memory ring (`pd/ring.py`), not gloo
    rank = 1 if computed["decode0"] else 2
    assert apps["prefill0"].state.pd.transport.channels[rank] == "shm"
    colocated = _complete(urls["prefill0"], body)
    assert via_pd["choices"][0]["text"] == colocated["choices"][0]["text"]


def test_chat_stream_matches_colocated(pd_cluster):
    url, urls, _, _ = pd_cluster
    body = {
        "model": "moska-tiny",
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "tell me about shared KV " * 6}],
    }

    def streamed(base):
        text = ""
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body | {"stream": True},
                          timeout=60) as r:  # fmt: skip
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    text += chunk["choices"][0]["delta"].get("content") or ""
        return text

    assert streamed(url) == streamed(urls["prefill0"])


def test_bad_body_is_the_instance_400(pd_cluster):
    url, _, _, _ = pd_cluster
    r = httpx.post(f"{url}/v1/completions", json={"model": "moska-tiny", "prompt": "x",
                   "max_tokens": 4, "temperature": -1}, timeout=30)  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(f"{url}/v1/completions", json={"model": "moska-tiny", "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_sequential_send_matches_too(pd_cluster):
    """The tests above went through the overlapped send (layers during the prefill step);
    without it (`--no-pd-overlap`) the KV goes out after the request ends: same tokens."""
    from moska.pd.stream import LayerCapture

    url, urls, apps, _ = pd_cluster
    inst = apps["prefill0"].state.pd
    assert inst.capture is not None
    inst.capture.remove()
    inst.capture = None
    sent, send = [], inst._send
    inst._send = lambda request, job: (sent.append(job), send(request, job))  # a spy
    try:
        body = {"model": "moska-tiny", "prompt": list(range(7, 7 + 53)), "max_tokens": 6,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        via_pd = _complete(url, body)
        assert (
            via_pd["choices"][0]["text"] == _complete(urls["prefill0"], body)["choices"][0]["text"]
        )
        assert len(sent) == 1  # the whole-prompt send after the request ended
    finally:
        del inst._send
        inst.capture = LayerCapture.install(inst.engine, inst._stream_step)
