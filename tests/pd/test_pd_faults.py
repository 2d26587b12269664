"""Faults: a decode instance (its own process) killed mid-stream: its request ends with an
error within 10 s, the front end stops routing to it and the other decode instance keeps
serving; a transfer to the dead rank fails (after one retry) instead of hanging."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import httpx
import pytest
import torch
from conftest import front_end, make_engine, pd_instances

from moska.server.background import background_server

pytestmark = pytest.mark.timeout(180)  # the session fixture starts processes


def _wait(pred, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_killed_decode_instance(victim, pd_cluster):  # the victim first: its start overlaps
    from moska.pd.frontend_app import create_frontend_app

    proc, port, master_port = victim
    first = pd_cluster[2]["prefill0"].state.moska.engine
    pairs = [(make_engine(first), "prefill"), (make_engine(first), "decode")]
    with pd_instances(pairs, master_port=master_port, world=3, timeout_s=120) as (urls, apps):
        victim_url = f"http://127.0.0.1:{port}"
        _wait(lambda: _ready(victim_url), 120, "the victim to start")
        front = front_end(urls | {"victim": victim_url}, health_interval_s=0.2)
        front.processes["victim"] = proc
        with background_server(create_frontend_app(front)) as url:
            _run_kill(url, front, proc)
            # the transfer group: a send to the dead rank fails, retried, bounded
            transport = apps["prefill0"].state.pd.transport
            assert transport.channels[2] == "shm"  # the victim, another process, took a ring
            got: dict = {}
            done = threading.Event()

            def finished(err, _s) -> None:
                got["err"] = err
                done.set()

            # a 0.25 s data timeout for this send (the group's is 5 s; two attempts each): the
            # receiver is dead, so it fails whatever the timeout; only the wait is shorter
            transport.endpoint = dataclasses.replace(transport.endpoint, timeout_s=0.25)
            t0 = time.monotonic()
            transport.send(99, 2, {"tokens": []}, [torch.ones(2, 1, 16, 1, 4)], finished)
            assert done.wait(30) and got["err"] is not None
            assert time.monotonic() - t0 < 30


def _ready(url):
    try:
        return httpx.get(f"{url}/pd/info", timeout=2).json().get("ready")
    except (httpx.HTTPError, ValueError):
        return False


def _run_kill(url, front, victim):
    survivor = next(i for i in front.instances if i.name == "decode0")
    survivor.alive = False  # steer the first request to the victim
    body = {"model": "moska-tiny", "prompt": "a long answer " * 4, "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    killed_at, ended_at, error = None, None, None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        survivor.alive = True
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error, ended_at = chunk["error"], time.monotonic()
                break
            if killed_at is None:
                victim.kill()
                killed_at = time.monotonic()
    assert killed_at is not None and error is not None, "the stream ended without an error"
    assert ended_at - killed_at < 10.0
    victim_inst = next(i for i in front.instances if i.name == "victim")
    _wait(lambda: not victim_inst.alive, 10, "the front end to mark the victim dead")
    for _ in range(3):  # the others keep serving, never on the dead instance
        r = httpx.post(f"{url}/v1/completions", json=body | {"stream": False, "max_tokens": 4},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
    assert not victim_inst.active
