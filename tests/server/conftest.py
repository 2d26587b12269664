"""Server fixtures: uvicorn on a free loopback port, in a thread, serving a real engine
(the built-in tiny model) or the fake one."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fake_engine import FakeEngine, FakeLibraryManager

from moska.server.app import create_app
from moska.server.settings import ServerSettings


@contextlib.contextmanager
def running_server(app, startup_timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 at a free port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


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


def pytest_configure(config):
    config.addinivalue_line("markers", "server: HTTP server tests")
