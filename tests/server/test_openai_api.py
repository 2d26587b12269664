"""The server with the real engine (tiny model), driven by the official openai client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.timeout(60)


def test_models(client, real_engine):
    models = client.models.list().data
    assert [m.id for m in models] == [real_engine.model_name]


def test_completion(client, model):
    r = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.model == model
    assert len(r.choices) == 1 and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_token_prompt_and_batch(client, model):
    r = client.completions.create(model=model, prompt=[72, 101, 108], max_tokens=3)
    assert r.usage.prompt_tokens == 3
    r = client.completions.create(model=model, prompt=["a", "bb"], max_tokens=2, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]


def test_chat(client, model):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 4


def test_streaming_matches_non_streaming(client, model):
    kw = {"model": model, "prompt": "Once upon", "max_tokens": 12, "temperature": 0}
    full = client.completions.create(**kw).choices[0].text
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_chat_streaming(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        stream=True,
        temperature=0,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    full = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
    )
    assert text == full.choices[0].message.content


def test_n_and_seed(client, model):
    kw = {"model": model, "prompt": "x", "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 1234}
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert (
        a.usage.completion_tokens == sum(len(c.text.encode()) for c in a.choices)
        or a.usage.completion_tokens > 0
    )


def test_logprobs(client, model):
    r = client.completions.create(model=model, prompt="ab", max_tokens=4, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) <= 2 for c in content)


def test_stop(client, model, real_engine):
    base = client.completions.create(model=model, prompt="s", max_tokens=20, temperature=0)
    text = base.choices[0].text
    # Pick a stop string from the middle of the greedy continuation.
    stop = next((text[i : i + 1] for i in range(2, len(text)) if text[i : i + 1].strip()), None)
    if stop is None:
        pytest.skip("greedy output has no printable character to stop at")
    r = client.completions.create(
        model=model, prompt="s", max_tokens=20, temperature=0, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]


def test_extra_body_library_unknown(client, model):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(
            model=model, prompt="x", max_tokens=2, extra_body={"library": "nope", "top_k_chunks": 2}
        )
    assert e.value.status_code == 404


def test_extra_body_library_bad_name(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=model, prompt="x", max_tokens=2, extra_body={"library": "../x"}
        )
    assert e.value.body["code"] == "invalid_library_name"


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt="x", max_tokens=2)


def test_prompt_too_long(client, model, real_engine):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=model, prompt="a" * (real_engine.max_model_len + 5), max_tokens=2
        )
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="a", max_tokens=10**6)


def test_validation_errors_are_400(real_server):
    url, _ = real_server
    r = httpx.post(
        f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "x", "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": []})
    assert r.status_code == 400
    r = httpx.get(f"{url}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_oversized_body(real_server):
    url, _ = real_server
    big = {"model": "m", "prompt": "a" * 100_000}
    r = httpx.post(f"{url}/v1/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(100):
            yield b"x" * 1024

    r = httpx.post(
        f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413


def test_health_and_metrics(real_server, client, model):
    url, _ = real_server
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["num_waiting"] == health["num_running"] == 0
    assert isinstance(health["failed_steps"], int)
    client.completions.create(model=model, prompt="m", max_tokens=3)
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "moska_queue_length",
        "moska_running_requests",
        "moska_generated_tokens_total",
        "moska_time_to_first_token_seconds_bucket",
        "moska_inter_token_latency_seconds_bucket",
        "moska_rejections",
        "moska_chunks_routed_total",
        "moska_generation_tokens_per_second",
    ):
        assert name in text, name


def test_disconnect_mid_stream_frees_request(real_server, real_engine, model):
    url, _ = real_server
    body = {"model": model, "prompt": "long", "max_tokens": 900, "stream": True, "ignore_eos": True}
    aborted = _aborted(url)
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{url}/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert real_engine.has_unfinished_requests()
    deadline = time.monotonic() + 10
    while real_engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not real_engine.has_unfinished_requests()
    assert _aborted(url) == aborted + 1


def test_disconnect_while_waiting_non_streaming(real_server, real_engine, model):
    url, _ = real_server
    body = {"model": model, "prompt": "wait", "max_tokens": 900, "ignore_eos": True}
    aborted = _aborted(url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while real_engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not real_engine.has_unfinished_requests()
    assert _aborted(url) == aborted + 1  # freed by the abort, not by running to the end


def _aborted(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('moska_requests_total{finish_reason="abort"}'):
            return float(line.split()[-1])
    return 0.0
