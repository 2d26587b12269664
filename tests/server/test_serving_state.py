"""State has one owner, and a failed step harms nothing else (issue 15, points 1, 2, 5).
The official `openai` client against a real uvicorn serving the real engine (tiny model)."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams
from moska.server.app import create_app
from moska.server.background import background_server
from moska.server.settings import ServerSettings

pytestmark = pytest.mark.timeout(120)

# Small libraries and few library tokens: under TRITON_INTERPRET=1 (the tests) every
# library step runs the routing and grouped-attention kernels in Triton's interpreter.
_TEXT_A = "The cat sat on the mat and looked at the moon. " * 2
_TEXT_B = "Seven green parrots argue about the price of tea. " * 2


def _build(engine, name: str, text: str, chunk_size: int = 32):
    return engine.libraries.build(name, [("doc.txt", text)], chunk_size=chunk_size)


def _stream(client, model, library=None, max_tokens=24, prompt="Tell me a story"):
    extra = {"ignore_eos": True}
    if library is not None:
        extra["library"] = library
    return client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body=extra,
    )


def _drain(stream) -> tuple[str, str | None, int]:
    text, reason, n = "", None, 0
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.text
            n += 1
            reason = choice.finish_reason or reason
    return text, reason, n


def test_delete_while_streaming_is_409_and_harms_no_stream(
    real_server, real_engine, model, monkeypatch
):
    url, _ = real_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    _build(real_engine, "inuse", _TEXT_A)
    # the engine thread holds after its next step until the DELETE has answered: the
    # library request is still running when it arrives (5 tokens can finish before it)
    hold, release = threading.Event(), threading.Event()
    step = real_engine.step

    def held_step(*args, **kwargs):
        out = step(*args, **kwargs)
        if hold.is_set():
            release.wait(30)
        return out

    monkeypatch.setattr(real_engine, "step", held_step)
    lib_stream = _stream(client, model, "inuse", max_tokens=5)
    plain_stream = _stream(client, model)
    hold.set()
    first = next(iter(lib_stream))  # the request is admitted and holds its library
    try:
        r = httpx.delete(f"{url}/v1/libraries/inuse")
    finally:
        hold.clear()
        release.set()
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "library_in_use_error" and "1 running request" in err["message"]
    text, reason, _ = _drain(lib_stream)
    assert reason == "length" and first.choices[0].text + text
    assert _drain(plain_stream)[1] == "length"
    # unused now: the delete goes through, later requests get a 404
    assert httpx.delete(f"{url}/v1/libraries/inuse").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(
            model=model, prompt="x", max_tokens=2, extra_body={"library": "inuse"}
        )
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_delete_with_wait_waits_for_the_stream(real_server, real_engine, model):
    url, _ = real_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    _build(real_engine, "waited", _TEXT_A)
    stream = _stream(client, model, "waited", max_tokens=5)
    next(iter(stream))
    result: dict = {}
    waiter = threading.Thread(
        target=lambda: result.update(r=httpx.delete(f"{url}/v1/libraries/waited?wait=true"))
    )
    waiter.start()
    # the stream is not disturbed by the waiting delete and ends normally
    assert _drain(stream)[1] == "length"
    waiter.join(60)
    assert result["r"].status_code == 200, result["r"].text
    assert httpx.get(f"{url}/v1/libraries/waited").status_code == 404


def _logprobs(client, model, library: str) -> tuple[list[float], int]:
    r = client.completions.create(
        model=model,
        prompt="Where is the cat? " * 3,
        max_tokens=2,
        temperature=0,
        logprobs=3,
        extra_body={"library": library},
    )
    return r.choices[0].logprobs.token_logprobs, r.usage.prompt_tokens_details.cached_tokens


def test_rebuild_under_the_same_name_reads_the_new_build(real_server, real_engine, model):
    url, _ = real_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    _build(real_engine, "rebuilt", _TEXT_A)
    old, _ = _logprobs(client, model, "rebuilt")
    again, cached = _logprobs(client, model, "rebuilt")
    assert cached > 0 and again == pytest.approx(old, abs=1e-4)  # the prefix cache hit
    assert httpx.delete(f"{url}/v1/libraries/rebuilt").status_code == 200
    _build(real_engine, "rebuilt", _TEXT_B)
    new, cached = _logprobs(client, model, "rebuilt")
    assert cached == 0  # nothing of the old build's KV is reused
    fresh = LLMEngine.from_model(
        None, device="cpu", max_model_len=1024, num_kv_blocks=256,
        library_root=str(real_engine.libraries.root),
    )  # fmt: skip
    params = SamplingParams(max_tokens=2, temperature=0, logprobs=3)
    fresh.add_request("f", "Where is the cat? " * 3, params, library="rebuilt")
    outs = []
    while fresh.has_unfinished_requests():
        outs += fresh.step()
    expected = [lp.logprob for lp in outs[-1].outputs[0].logprobs]
    assert new == pytest.approx(expected, abs=1e-4)
    assert new != pytest.approx(old, abs=1e-4)  # the two builds do differ
    httpx.delete(f"{url}/v1/libraries/rebuilt")


def test_injected_runner_fault_fails_only_its_request(real_server, real_engine, model):
    url, _ = real_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    reference = _drain(_stream(client, model, max_tokens=20, prompt="Once upon"))
    poison = [7, 7, 7, 7, 7, 7]
    runner = real_engine.runner
    launch = runner.launch

    def faulty(scheduled, *args, **kwargs):
        if any(s.request.prompt_token_ids == poison for s in scheduled):
            raise RuntimeError("injected kernel fault")
        return launch(scheduled, *args, **kwargs)

    failed_before = httpx.get(f"{url}/health").json()["failed_steps"]
    runner.launch = faulty
    try:
        stream = _stream(client, model, max_tokens=20, prompt="Once upon")
        first = next(iter(stream)).choices[0].text
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=model, prompt=poison, max_tokens=4)
        assert "injected kernel fault" in str(info.value)
        # streamed: an SSE error event, then [DONE]
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            json={"model": model, "prompt": poison, "max_tokens": 4, "stream": True},
        ) as r:
            lines = [x for x in r.iter_lines() if x]
        assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
        text, reason, _ = _drain(stream)
    finally:
        runner.launch = launch
    # the request that shared the failed steps finished with the same tokens as without
    assert (first + text, reason) == reference[:2]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["failed_steps"] >= failed_before + 2
    r = client.completions.create(model=model, prompt=poison, max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")
    real_engine.block_manager.check_integrity()


def test_default_max_tokens_counts_the_library(real_engine):
    """Without max_tokens a request gets what the library and its prompt leave of the
    context (it was a 400: the default ignored the library); usage names the library."""
    small = LLMEngine.from_model(
        None, device="cpu", max_model_len=128, num_kv_blocks=64,
        library_root=str(real_engine.libraries.root),
    )  # fmt: skip
    info = _build(small, "wide", "alpha beta gamma delta " * 5)
    assert 100 < info.num_tokens < 120
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    with background_server(create_app(small, ServerSettings())) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(
            model=small.model_name,
            messages=[{"role": "user", "content": "Hi"}],
            extra_body={"library": "wide", "ignore_eos": True},
        )
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 128 - info.num_tokens - r.usage.prompt_tokens
        assert r.usage.prompt_tokens_details.library_tokens == info.num_tokens
        # a max_tokens past what is left is a 400 that counts the library
        with pytest.raises(openai.BadRequestError, match="library"):
            client.completions.create(
                model=small.model_name, prompt=prompt, max_tokens=20, extra_body={"library": "wide"}
            )
        assert httpx.delete(f"{url}/v1/libraries/wide").status_code == 200
