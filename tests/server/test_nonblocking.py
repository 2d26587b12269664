"""Nothing blocks the event loop or the engine thread: tokenization runs on a bounded pool,
library builds run on the build worker beside the engine (quota, progress, cancel)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from conftest import job_ended, running_server, wait_library_job
from fake_engine import FakeEngine, FakeLibraryManager, FakeTokenizer

from moska.server.app import create_app
from moska.server.errors import APIError
from moska.server.settings import ServerSettings
from moska.server.tokenizer_pool import TokenizerPool

pytestmark = pytest.mark.timeout(120)
HEALTH_SLO_S = 1.0


@pytest.fixture(scope="module")
def nb_server():
    """(url, app, engine): a real engine on the tiny model of its own (a second server
    must not step the session's engine), 16 MB bodies, prompts up to 2M characters."""
    from moska.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_model(None, device="cpu", max_model_len=1024, num_kv_blocks=512)
    settings = ServerSettings(max_body_bytes=16 * 1024 * 1024, max_prompt_chars=2_000_000)
    app = create_app(engine, settings)
    with running_server(app) as url:
        yield url, app, engine


def _while_in_flight(send: Callable[[], httpx.Response], url: str) -> tuple:
    """Run `send()` in a thread and poll /health until it returns: (its response, the
    /health latencies measured while it was in flight)."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", send()), daemon=True)
    latencies = []
    with httpx.Client(timeout=30) as client:
        thread.start()
        while thread.is_alive():
            t0 = time.perf_counter()
            assert client.get(f"{url}/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
    thread.join()
    return result["r"], latencies


def _chat(url: str, model: str, content: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def _model(url: str) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def test_10mb_message_is_refused_and_health_stays_responsive(nb_server):
    url, _, _ = nb_server
    model = _model(url)
    r, latencies = _while_in_flight(lambda: _chat(url, model, "x" * 10_000_000), url)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and err["code"] == "context_length_exceeded"
    assert latencies and max(latencies) < HEALTH_SLO_S, latencies


def test_long_message_is_tokenized_off_the_event_loop(nb_server):
    """A message that takes seconds to encode is encoded (then refused for its token
    count), while /health keeps answering within the SLO."""
    url, _, _ = nb_server
    model = _model(url)
    t0 = time.perf_counter()
    r, latencies = _while_in_flight(lambda: _chat(url, model, "hello world. " * 60_000), url)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "tokens" in err["message"]
    assert "characters" not in err["message"]  # counted in tokens: it was tokenized
    assert max(latencies) < HEALTH_SLO_S, latencies
    assert len(latencies) >= min(3, int(elapsed / HEALTH_SLO_S)), (elapsed, latencies)


def test_tokenizer_pool_bounds():
    async def scenario() -> None:
        pool = TokenizerPool(FakeTokenizer(), 100, workers=1, max_pending_chars=1000)
        assert await pool.max_prompt_chars() == 200  # 100 tokens of one character, doubled
        with pytest.raises(APIError) as e:  # one prompt longer than the context can hold
            await pool.run(lambda: [1], 201, "prompt")
        assert e.value.status == 400 and e.value.param == "prompt"
        release = threading.Event()
        blocked = asyncio.ensure_future(pool.run(lambda: release.wait(10), 150, "prompt"))
        await asyncio.sleep(0)  # let it take its share of the bound
        assert pool._pending == 150
        pool._max_prompt_chars = 10_000
        with pytest.raises(APIError) as e:  # beyond the pending-characters bound
            await pool.run(lambda: [1], 900, "messages")
        assert e.value.status == 429 and e.value.code == "tokenizer_busy"
        release.set()
        assert await blocked is True
        assert await pool.run(lambda: [7], 150, "prompt") == [7]  # free again
        pool.shutdown()

    asyncio.run(scenario())


# ---------------------------------------------------------------- builds, real engine


def _post_build(url: str, name: str, num_chars: int) -> dict:
    text = ("The quick brown fox jumps over the lazy dog. " * (num_chars // 45 + 1))[:num_chars]
    r = httpx.post(
        f"{url}/v1/libraries", json={"name": name, "documents": [{"name": "a", "text": text}]}
    )
    assert r.status_code == 202, r.text
    return r.json()


def _job(url: str, job_id: str) -> dict:
    r = httpx.get(f"{url}/v1/libraries/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _wait_job(url: str, job_id: str, until: Callable[[dict], bool]) -> dict:
    return wait_library_job(url, job_id, until, timeout_s=90)


def test_stream_keeps_producing_during_a_build(nb_server):
    url, _app, engine = nb_server
    stamps: list[float] = []
    stop = threading.Event()

    def stream() -> None:
        body = {
            "model": _model(url),
            "prompt": "Once upon a time",
            "max_tokens": 900,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if stop.is_set():
                    return  # closing the stream aborts the request
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter())

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    try:
        deadline = time.monotonic() + 60
        while len(stamps) < 5:
            assert streamer.is_alive() and time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.01)
        b0 = time.perf_counter()
        # 1,000 tokens, two 512-token prefill pieces: over 100 stamps land inside the build
        # and the longest gap is < 0.1 of it (2,000 tokens only doubled the build's time)
        job = _post_build(url, "nb-during", 1000)
        job = _wait_job(url, job["id"], job_ended)
        b1 = time.perf_counter()
    finally:
        stop.set()
    assert job["status"] == "succeeded", job
    assert job["total_tokens"] >= 1000 and job["prefilled_tokens"] == job["total_tokens"]
    assert streamer.is_alive() or len(stamps) < 900, "the stream ended before the build did"
    inside = [t for t in stamps if b0 <= t <= b1]
    edges = [b0, *inside, b1]
    longest_gap = max(b - a for a, b in itertools.pairwise(edges))
    assert len(inside) >= 3, (len(inside), b1 - b0)
    assert longest_gap < 0.5 * (b1 - b0), (longest_gap, b1 - b0)
    # registered with the engine's manager: new requests can read it
    assert "nb-during" in engine.libraries.loaded_names()
    streamer.join(30)


def test_cancel_running_and_queued_builds(nb_server):
    url, app, engine = nb_server
    builds = app.state.moska.builds
    builds.prefill_tokens = 64  # many pieces: the cancel lands between two of them
    root = engine.libraries.root
    try:
        running = _post_build(url, "nb-cancel-a", 3000)
        running = _wait_job(url, running["id"], lambda j: j["prefilled_tokens"] > 0 or job_ended(j))
        assert running["status"] == "running", running
        queued = _post_build(url, "nb-cancel-b", 500)  # one build at a time: it waits
        assert queued["status"] == "queued", queued
        r = httpx.post(f"{url}/v1/libraries/jobs/{queued['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        assert httpx.delete(f"{url}/v1/libraries/jobs/{running['id']}").status_code == 200
        running = _wait_job(url, running["id"], job_ended)
    finally:
        builds.prefill_tokens = 512
    assert running["status"] == "cancelled", running
    assert 0 < running["prefilled_tokens"] < running["total_tokens"]
    assert _job(url, queued["id"])["prefilled_tokens"] == 0  # it never started
    for name in ("nb-cancel-a", "nb-cancel-b"):  # nothing on disk, nothing loaded
        assert not [p.name for p in root.iterdir() if name in p.name]
        assert httpx.get(f"{url}/v1/libraries/{name}").status_code == 404
        assert name not in engine.libraries.loaded_names()
    again = _post_build(url, "nb-cancel-b", 100)  # the cancelled job's name is free again
    assert _wait_job(url, again["id"], job_ended)["status"] == "succeeded"
    assert httpx.post(f"{url}/v1/libraries/jobs/libjob-nope/cancel").status_code == 404


# ---------------------------------------------------------------- builds, fake engine


def test_build_quota_and_queue_on_the_fake_engine():
    manager = FakeLibraryManager(build_seconds=2.0)
    engine = FakeEngine(libraries=manager)
    settings = ServerSettings(max_build_tokens=100, max_queued_builds=1)
    app = create_app(engine, settings)
    with running_server(app) as url:
        body = {"model": "fake-model", "prompt": "x", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        over = _post_build(url, "too-big", 101)
        over = _wait_job(url, over["id"], job_ended)
        assert over["status"] == "failed" and "max_build_tokens" in over["error"], over
        assert over["total_tokens"] == 101 and over["prefilled_tokens"] == 0

        first = _post_build(url, "one", 50)
        _wait_job(url, first["id"], lambda j: j["status"] == "running")
        second = _post_build(url, "two", 50)  # waits behind the first
        body = {"name": "three", "documents": [{"name": "a", "text": "x"}]}
        r = httpx.post(f"{url}/v1/libraries", json=body)
        assert r.status_code == 429 and r.json()["error"]["code"] == "build_queue_full", r.text
        for job in (second, first):
            httpx.post(f"{url}/v1/libraries/jobs/{job['id']}/cancel")
            assert _wait_job(url, job["id"], job_ended)["status"] == "cancelled"
        assert manager.list() == []
        # builds ran on the build worker, never on the thread that steps the engine
        assert manager.build_thread_ids and not manager.build_thread_ids & engine.step_threads
