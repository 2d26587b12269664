"""Rank 0's heartbeat rule once a collective has failed (`Monitor.await_failure`, #18 item 1):
a rank it watches only by its heartbeat (a torchrun rank on another host) is named when its
counter stays still for STALLED_BEATS heartbeats, and a rank whose counter moves, even after
a stall (alive, only slow), is never named. Ranks here are threads bumping counters in a real
TCPStore as workers do (worker._heartbeat), with a shorter heartbeat; the monitor's thread
runs too. End to end (a SIGKILLed torchrun rank): test_torchrun_rank_failure.py."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from moska.distributed import rank_monitor
from moska.distributed.rank_monitor import Monitor

pytestmark = pytest.mark.timeout(30)

BEAT_S = 0.5  # HEARTBEAT_S in these tests: the window is STALLED_BEATS * BEAT_S = 1.5 s, so a
# stall of the whole test process must pass 1 s to name the slow rank (0.2 before: 0.4 s)


@pytest.fixture
def monitor(monkeypatch):
    monkeypatch.setattr(rank_monitor, "HEARTBEAT_S", BEAT_S)
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=10))
    mon = Monitor(SimpleNamespace(store=store, world_size=4, backend="gloo"))
    mon.start()
    yield mon
    mon.stop()


def _beat(store, rank: int, stop: threading.Event, resume_s: float = 0.0) -> threading.Thread:
    """Rank `rank`'s heartbeat: one beat now, then none for `resume_s` (a stall), then one
    every quarter heartbeat until `stop`."""

    def run() -> None:
        store.add(f"moska/heartbeat/{rank}", 1)
        if stop.wait(resume_s):
            return
        while not stop.wait(BEAT_S / 4):
            store.add(f"moska/heartbeat/{rank}", 1)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_stopped_heartbeat_is_named_a_resumed_one_is_not(monitor):
    store, stop = monitor.groups.store, threading.Event()
    store.add("moska/heartbeat/2", 1)  # rank 2 beat once, then died
    beats = [_beat(store, 1, stop), _beat(store, 3, stop, resume_s=BEAT_S)]  # 3: slow
    try:
        t0 = time.monotonic()
        failure = monitor.await_failure(wait_s=5.0)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        for t in beats:
            t.join(5)
    window = rank_monitor.STALLED_BEATS * BEAT_S
    assert failure is not None and failure.rank == 2, failure
    assert "distributed rank 2 failed: no heartbeat" in str(failure)
    assert "rank(s)" not in failure.reason  # the slow rank 3 is not named with it
    assert window <= elapsed < window + 1.0


def test_a_slow_rank_alone_is_never_named(monitor):
    store, stop = monitor.groups.store, threading.Event()
    # every rank stalls for a heartbeat after the collective failed, then beats again
    beats = [_beat(store, r, stop, resume_s=BEAT_S) for r in (1, 2, 3)]
    try:
        failure = monitor.await_failure(wait_s=(rank_monitor.STALLED_BEATS + 1) * BEAT_S)
    finally:
        stop.set()
        for t in beats:
            t.join(5)
    assert failure is None and monitor.failure is None
