"""Server fixtures: uvicorn on a free loopback port, in a thread, serving a real engine
(the built-in tiny model) or the fake one."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import openai
import pytest
from fake_engine import FakeEngine, FakeLibraryManager

from moska.server.app import create_app
from moska.server.background import background_server
from moska.server.settings import ServerSettings

running_server = background_server


def job_ended(job: dict) -> bool:
    return job["status"] not in ("queued", "running")


def wait_library_job(
    url: str,
    job_id: str,
    until: Callable[[dict], bool] = job_ended,
    timeout_s: float = 30.0,
    headers: dict | None = None,
) -> dict:
    """Poll `GET /v1/libraries/jobs/{job_id}` until `until(job)` (default: the build ended:
    succeeded, failed or cancelled); the job then, an AssertionError naming it at the
    deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.get(f"{url}/v1/libraries/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        if until(job := r.json()):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


@pytest.fixture(scope="session")
def real_engine():
    from moska.engine.llm_engine import LLMEngine

    return LLMEngine.from_model(None, device="cpu", max_model_len=1024, num_kv_blocks=2048)


@pytest.fixture(scope="session")
def real_server(real_engine):
    """(base_url, app) of a server with the real engine and the tiny model."""
    app = create_app(real_engine, ServerSettings(max_body_bytes=64 * 1024))
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="session")
def fake_server():
    engine = FakeEngine(libraries=FakeLibraryManager(build_seconds=0.2))
    app = create_app(engine, ServerSettings(api_key="sekret", max_body_bytes=64 * 1024))
    with running_server(app) as url:
        yield url, app, engine


@pytest.fixture
def client(real_server):
    url, _ = real_server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def model(client):
    return client.models.list().data[0].id


def pytest_configure(config):
    config.addinivalue_line("markers", "server: HTTP server tests")
