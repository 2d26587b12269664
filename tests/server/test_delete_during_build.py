"""DELETE of a library name whose build is still running is a 409 naming the job to
cancel, not a 404 that says to build it (issue 15, point 10's store hygiene)."""

from __future__ import annotations

import httpx
import pytest
from conftest import wait_library_job
from fake_engine import FakeEngine, FakeLibraryManager

from moska.server.app import create_app
from moska.server.background import background_server

pytestmark = pytest.mark.server


def test_delete_while_building_is_409_naming_the_job():
    manager = FakeLibraryManager(build_seconds=3.0)  # ten pieces: a cancel lands in 0.3 s
    with background_server(create_app(FakeEngine(libraries=manager))) as url:
        body = {"name": "growing", "documents": [{"name": "a", "text": "x" * 64}]}
        job = httpx.post(f"{url}/v1/libraries", json=body).json()
        r = httpx.delete(f"{url}/v1/libraries/growing")
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "library_busy_error" and job["id"] in err["message"]
        httpx.post(f"{url}/v1/libraries/jobs/{job['id']}/cancel")
        wait_library_job(url, job["id"], lambda j: j["status"] == "cancelled", timeout_s=10)
        assert httpx.delete(f"{url}/v1/libraries/growing").status_code == 404  # nothing left
