"""Auth, library endpoints and failure handling, on the fake engine."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from conftest import running_server, wait_library_job
from fake_engine import FakeEngine

from moska.server.app import create_app
from moska.server.settings import ServerSettings

pytestmark = pytest.mark.timeout(60)
AUTH = {"Authorization": "Bearer sekret"}


def test_api_key_required(fake_server):
    url, _, _ = fake_server
    assert httpx.get(f"{url}/health").status_code == 200  # open without a key
    r = httpx.get(f"{url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer x"}).status_code == 401
    assert httpx.get(f"{url}/metrics").status_code == 401
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="fake-model", prompt="x", max_tokens=2)
    good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
    r = good.completions.create(model="fake-model", prompt="x", max_tokens=3)
    assert len(r.choices[0].text) == 3


def _wait_job(url: str, job_id: str) -> dict:
    return wait_library_job(url, job_id, timeout_s=10, headers=AUTH)


def test_library_lifecycle(fake_server):
    url, _, engine = fake_server
    body = {
        "name": "handbook",
        "documents": [{"name": "a.txt", "text": "hello " * 50}],
        "chunk_size": 32,
    }
    r = httpx.post(f"{url}/v1/libraries", json=body, headers=AUTH)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and r.headers["location"].endswith(job["id"])
    job = _wait_job(url, job["id"])
    assert job["status"] == "succeeded" and job["library"]["num_chunks"] == 10

    names = [x["name"] for x in httpx.get(f"{url}/v1/libraries", headers=AUTH).json()["data"]]
    assert names == ["handbook"]
    info = httpx.get(f"{url}/v1/libraries/handbook", headers=AUTH).json()
    assert info["chunk_size"] == 32 and info["mode"] == "prefix"

    # a completion that reads it
    good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
    r = good.completions.create(
        model="fake-model",
        prompt="q",
        max_tokens=2,
        extra_body={"library": "handbook", "top_k_chunks": 2},
    )
    assert r.choices[0].finish_reason == "length"
    # no library manager call ran on the event loop (they may block: file reads, locks)
    assert engine.libraries.loop_calls == 0
    assert threading.get_ident() not in engine.step_threads

    # building it again fails inside the job
    r = httpx.post(f"{url}/v1/libraries", json=body, headers=AUTH)
    job = _wait_job(url, r.json()["id"])
    assert job["status"] == "failed" and "already exists" in job["error"]

    r = httpx.delete(f"{url}/v1/libraries/handbook", headers=AUTH)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert httpx.get(f"{url}/v1/libraries/handbook", headers=AUTH).status_code == 404
    assert httpx.delete(f"{url}/v1/libraries/handbook", headers=AUTH).status_code == 404
    with pytest.raises(openai.NotFoundError):
        good.completions.create(
            model="fake-model", prompt="q", max_tokens=2, extra_body={"library": "handbook"}
        )


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65, "a b"])
def test_library_bad_names(fake_server, name):
    url, _, _ = fake_server
    body = {"name": name, "documents": [{"name": "a", "text": "b"}]}
    r = httpx.post(f"{url}/v1/libraries", json=body, headers=AUTH)
    assert r.status_code == 400, (name, r.text)
    assert "error" in r.json()


def test_library_path_name_in_url(fake_server):
    url, _, _ = fake_server
    for path in ("..%2Fx", "..", "a%20b"):
        r = httpx.get(f"{url}/v1/libraries/{path}", headers=AUTH)
        assert 400 <= r.status_code < 500, (path, r.status_code)
    assert httpx.get(f"{url}/v1/libraries/jobs/nope", headers=AUTH).status_code == 404


def test_no_library_manager_is_501():
    app = create_app(FakeEngine(), ServerSettings())
    with running_server(app) as url:
        for method, path in (
            ("GET", "/v1/libraries"),
            ("GET", "/v1/libraries/x"),
            ("DELETE", "/v1/libraries/x"),
        ):
            r = httpx.request(method, f"{url}{path}")
            assert r.status_code == 501 and r.json()["error"]["code"] == "not_implemented"
        r = httpx.post(
            f"{url}/v1/libraries", json={"name": "x", "documents": [{"name": "a", "text": "b"}]}
        )
        assert r.status_code == 501


def test_engine_step_failure_fails_requests_and_keeps_serving():
    engine = FakeEngine(step_delay=0.01)
    app = create_app(engine, ServerSettings())
    with running_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        engine.fail_next_step = True
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="fake-model", prompt="x", max_tokens=3)
        r = client.completions.create(model="fake-model", prompt="x", max_tokens=3)
        assert len(r.choices[0].text) == 3
        assert not engine.has_unfinished_requests()


def test_shutdown_drains_accepted_requests():
    """Requests in flight when the server is asked to stop still complete."""
    engine = FakeEngine(step_delay=0.02)
    app = create_app(engine, ServerSettings())
    results: list = []
    with running_server(app) as url:

        def call():
            r = httpx.post(
                f"{url}/v1/completions",
                timeout=30,
                json={"model": "fake-model", "prompt": "x", "max_tokens": 20},
            )
            results.append(r.json())

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        aengine = app.state.moska.async_engine
        deadline = time.monotonic() + 20
        while aengine.num_in_flight < 4:  # all four accepted before the server stops
            assert time.monotonic() < deadline, "the requests were not accepted"
            time.sleep(0.005)
    for t in threads:
        t.join(10)
    assert len(results) == 4
    assert all(len(r["choices"][0]["text"]) == 20 for r in results)
    assert not app.state.moska.async_engine.alive
