"""Libraries through the OpenAI-compatible server with the real engine (tiny model): build,
list, delete, generate with one, and the per-choice routing report."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import wait_library_job

pytestmark = pytest.mark.timeout(60)


def _build_library(url: str, name: str) -> dict:
    docs = [
        {"name": f"d{i}.txt", "text": f"Document {i}. " + "The cat sat on the mat. " * 8}
        for i in range(3)
    ]
    r = httpx.post(f"{url}/v1/libraries", json={"name": name, "documents": docs, "chunk_size": 64})
    assert r.status_code == 202, r.text
    return wait_library_job(url, r.json()["id"])


def test_library_lifecycle_real_engine(real_server):
    url, _ = real_server
    job = _build_library(url, "kb-life")
    assert job["status"] == "succeeded", job
    assert job["library"]["num_chunks"] >= 2 and "path" not in job["library"]
    names = [x["name"] for x in httpx.get(f"{url}/v1/libraries").json()["data"]]
    assert "kb-life" in names
    assert httpx.get(f"{url}/v1/libraries/kb-life").json()["chunk_size"] == 64
    assert httpx.delete(f"{url}/v1/libraries/kb-life").status_code == 200
    assert httpx.get(f"{url}/v1/libraries/kb-life").status_code == 404
    assert httpx.delete(f"{url}/v1/libraries/kb-life").status_code == 404


def test_generate_with_library_real_engine(real_server, client, model):
    url, _ = real_server
    assert _build_library(url, "kb-gen")["status"] == "succeeded"
    try:
        r = client.completions.create(
            model=model,
            prompt="Where did the cat sit?",
            max_tokens=4,
            extra_body={"library": "kb-gen", "top_k_chunks": 2},
        )
        assert r.choices[0].finish_reason in ("length", "stop")
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "cat?"}],
            max_tokens=3,
            stream=True,
            extra_body={"library": "kb-gen"},
        )
        assert list(stream)[-1].choices[0].finish_reason in ("length", "stop")
        metrics = httpx.get(f"{url}/metrics").text
        routed = [x for x in metrics.splitlines() if x.startswith("moska_chunks_routed_total")]
        assert routed and float(routed[0].split()[-1]) > 0
    finally:
        httpx.delete(f"{url}/v1/libraries/kb-gen")


# ---------------------------------------------------------------- routing report


@pytest.fixture(scope="module")
def routing_library(real_server):
    """(name, num_chunks) of a library built once for the routing-report tests."""
    url, _ = real_server
    job = _build_library(url, "kb-route")
    assert job["status"] == "succeeded", job
    yield "kb-route", job["library"]["num_chunks"]
    httpx.delete(f"{url}/v1/libraries/kb-route")


def _routing(choice) -> dict | None:
    return (choice.model_extra or {}).get("moska_routing")


_DOC_NAMES = ["d0.txt", "d1.txt", "d2.txt"]  # _build_library's documents, in order


def _check_report(report: dict, num_chunks: int, top_k: int) -> None:
    """Each routed chunk names the document it starts in and its token span (chunk_size 64:
    chunk c is tokens [64c, 64c + 64), the last one shorter)."""
    assert set(report) == {"chunks", "coverage"}
    ids = [c["chunk"] for c in report["chunks"]]
    assert len(ids) == min(top_k, num_chunks) and ids == sorted(set(ids))
    for c in report["chunks"]:
        assert set(c) == {"chunk", "document", "start", "end"}
        assert isinstance(c["chunk"], int) and 0 <= c["chunk"] < num_chunks
        assert c["document"] in _DOC_NAMES and c["start"] == 64 * c["chunk"]
        assert 0 < c["end"] - c["start"] <= 64
        assert c["end"] - c["start"] == 64 or c["chunk"] == num_chunks - 1
    assert 0.0 <= report["coverage"] <= 1.0


def test_report_routing_completion(client, model, routing_library):
    name, num_chunks = routing_library
    kw = {"model": model, "prompt": "Where did the cat sit?", "max_tokens": 1, "n": 2}
    r = client.completions.create(
        **kw, extra_body={"library": name, "top_k_chunks": 1, "report_routing": True}
    )
    assert len(r.choices) == 2
    for choice in r.choices:
        _check_report(_routing(choice), num_chunks, 1)
    r = client.completions.create(
        **kw, extra_body={"library": name, "top_k_chunks": num_chunks, "report_routing": True}
    )
    for choice in r.choices:
        report = _routing(choice)
        _check_report(report, num_chunks, num_chunks)
        assert [c["chunk"] for c in report["chunks"]] == list(range(num_chunks))
        docs = [c["document"] for c in report["chunks"]]  # documents in order, each ~205 tokens
        assert docs[0] == "d0.txt" and set(docs) == set(_DOC_NAMES)
        assert docs == sorted(docs, key=_DOC_NAMES.index)
        assert report["coverage"] == pytest.approx(1.0, abs=1e-4)  # every chunk: all the mass


def test_report_routing_chat(client, model, routing_library):
    name, num_chunks = routing_library
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "cat?"}],
        max_tokens=1,
        extra_body={"library": name, "top_k_chunks": 2, "report_routing": True},
    )
    _check_report(_routing(r.choices[0]), num_chunks, 2)
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "cat?"}],
        max_tokens=2,
        extra_body={"library": name, "top_k_chunks": 10**6, "report_routing": True},
    )
    assert _routing(r.choices[0])["coverage"] == pytest.approx(1.0, abs=1e-4)


def test_report_routing_streaming_on_final_chunk_only(client, model, routing_library):
    name, num_chunks = routing_library
    # Every chunk (no router pass: fast on CPU); logprobs make one chunk per token.
    extra = {"library": name, "top_k_chunks": num_chunks, "report_routing": True}
    streams = [
        client.completions.create(
            model=model, prompt="cat", max_tokens=3, logprobs=1, stream=True, extra_body=extra
        ),
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "cat?"}],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        ),
    ]
    for stream in streams:
        choices = [c.choices[0] for c in stream if c.choices]
        assert len(choices) >= 2
        assert choices[-1].finish_reason in ("length", "stop")
        _check_report(_routing(choices[-1]), num_chunks, num_chunks)
        assert all(_routing(c) is None for c in choices[:-1])


def test_report_routing_needs_a_library(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=model, prompt="x", max_tokens=2, extra_body={"report_routing": True}
        )
    assert e.value.body["code"] == "report_routing_requires_library"
    assert e.value.body["param"] == "report_routing"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=2,
            stream=True,
            extra_body={"report_routing": True},
        )
    assert e.value.body["code"] == "report_routing_requires_library"


def test_no_routing_report_unless_asked(real_server, model, routing_library):
    url, _ = real_server
    name, num_chunks = routing_library
    plain = {"model": model, "prompt": "cat", "max_tokens": 2}
    lib = {"library": name, "top_k_chunks": num_chunks}
    for body in (plain, {**plain, **lib}, {**plain, **lib, "report_routing": False}):
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert "moska_routing" not in r.json()["choices"][0]
    chat = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = httpx.post(f"{url}/v1/chat/completions", json={**chat, **lib, "stream": True})
    assert r.status_code == 200 and "moska_routing" not in r.text
    r = httpx.post(f"{url}/v1/chat/completions", json={**chat, **lib})
    assert "moska_routing" not in r.json()["choices"][0]
