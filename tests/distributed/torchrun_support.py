"""What the torchrun tests share: a free port, the environment torchrun gives a worker, and
forked ranks run to the end with their reports collected (bounded: a hang fails the test)."""

from __future__ import annotations

import os
import queue
import socket
import time
from collections.abc import Callable

from gloo_ranks import forkserver_context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_torchrun_env(rank: int, world: int, port: int) -> None:
    """The variables torchrun sets for each worker on one host."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def run_ranks(
    target: Callable[..., None], world: int, args: tuple, wait_s: float = 50.0
) -> tuple[dict[int, tuple], list[int | None]]:
    """Fork `world` ranks running target(rank, world, port, args, results); each puts one
    (rank, kind, value) on results. Returns {rank: (kind, value)} and the exit codes."""
    ctx = forkserver_context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, args, results)) for r in range(world)]
    got: dict[int, tuple] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + wait_s
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, kind, value = results.get(timeout=1.0)
            except queue.Empty:
                continue
            got[rank] = (kind, value)
        for p in procs:
            p.join(timeout=10)
        return got, [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
