"""A rank that stops answering never hangs rank 0 (issue #18: every collective has a
timeout). 2 forked gloo ranks join the runtime's own groups (ProcessGroups: the model group,
and the control group whose rank-0 side is bounded by MOSKA_DIST_CONTROL_TIMEOUT_S while the
workers wait on theirs without one); rank 1 is alive but stuck:

- mid-capture: it ran the capture's collective with rank 0 and never answers GRAPH_CAPTURE;
  rank 0 raises RankFailedError within the control timeout (it waited forever before);
- mid-step: it took a FORWARD and never reaches the forward's collective; rank 0's
  collective fails within the model group's timeout, and the engine's check
  (`DistributedRuntime.failure_after`) makes it a RankFailedError.

Then rank 0 releases rank 1 (an event), which leaves."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from gloo_ranks import forkserver_context, run_ranks

pytestmark = pytest.mark.timeout(60)

CONTROL_S = 1.5  # rank 0's control-group timeout in these runs
STEP_S = 1.0  # the model group's, for the mid-step case


class _Released(BaseException):
    """Ends the stuck rank once rank 0 is done (a BaseException: a capture's `except
    Exception` would turn an Exception into an answer, which rank 0 no longer waits for)."""


def _groups(rank: int, world: int):
    """Leave run_ranks' group for the runtime's ProcessGroups (rank 0 hosts the store)."""
    import torch.distributed as dist

    from moska.distributed.runtime import ProcessGroups, Rendezvous

    os.environ["MOSKA_DIST_CONTROL_TIMEOUT_S"] = str(CONTROL_S)
    port, store = torch.zeros(1, dtype=torch.int64), None
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
        port[0] = store.port
    dist.broadcast(port, 0)
    dist.destroy_process_group()
    rdv = Rendezvous(world, "127.0.0.1", int(port), "gloo")
    if rank == 0:
        return ProcessGroups._init(rdv, 0, store, timedelta(seconds=20))
    return ProcessGroups.join(rdv, rank)


def _stuck_rank(rank: int, world: int, case: str, release) -> dict:
    import torch.distributed as dist

    from moska.distributed.errors import RankFailedError
    from moska.distributed.runtime import DistributedRuntime
    from moska.distributed.step_channel import StepChannel
    from moska.distributed.tp_graphs import TensorParallelGraphs
    from moska.distributed.worker import serve_steps
    from moska.engine.cuda_graphs import GraphCaptureError

    groups = _groups(rank, world)
    cpu = torch.device("cpu")
    channel = StepChannel(groups.comm, groups.control, cpu, 8, torch.float32)
    kw = {"attention": None, "scratch_block": 9, "block_size": 16, "max_blocks": 4,
          "max_batch": 8, "device": cpu}  # fmt: skip
    graphs = TensorParallelGraphs(
        model=SimpleNamespace(driver=channel if rank == 0 else None), **kw
    )

    def capture(b: int, spec):  # the capture's collective, with every rank
        groups.comm.all_reduce(torch.ones(1))
        if rank:  # then rank 1 stops answering (alive, not dead)
            release.wait(30)
            raise _Released
        return SimpleNamespace(hidden=None)

    graphs._capture = capture  # type: ignore[method-assign]
    if rank:
        model = SimpleNamespace(greedy_tokens=None, compute_logits=None)

        def stuck_forward(*args):  # before the forward's first collective
            release.wait(30)
            raise _Released

        try:
            serve_steps(stuck_forward, SimpleNamespace(bind=lambda m: m), channel, cpu,
                        libraries=object(), graphs=graphs)  # fmt: skip
        except _Released:
            return {"released": True, "model": model is not None}
        return {"released": False}
    out: dict = {}
    t0 = time.monotonic()
    try:
        if case == "capture":
            with pytest.raises(RankFailedError, match="answers to the last command") as e:
                graphs._get(2, None)
            out["error"] = str(e.value)
            out["typed"] = channel.failure is e.value  # kept: the runtime kills, sends no STOP
        else:
            from moska.attention.metadata import AttentionMetadata

            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=STEP_S))  # model group
            ids = torch.randint(3, 200, (3,))
            meta = AttentionMetadata(torch.arange(3), torch.arange(4, dtype=torch.int32),
                                     torch.ones(3, dtype=torch.int32),
                                     torch.zeros(3, 1, dtype=torch.int32), decode_only=True)  # fmt: skip
            channel.send_forward(ids, torch.arange(3), SimpleNamespace(meta=meta))
            with pytest.raises(RuntimeError) as e:  # gloo's timeout (a DistError)
                groups.comm.all_reduce(torch.ones(3, 8))
            stub = SimpleNamespace(monitor=SimpleNamespace(failure=None))
            failure = DistributedRuntime.failure_after(stub, e.value, wait_s=0.0)  # type: ignore[arg-type]
            out["error"] = str(failure)
            out["typed"] = isinstance(failure, RankFailedError)
        out["elapsed"] = time.monotonic() - t0
    except GraphCaptureError as e:  # the capture went wrong another way: reported
        out["error"] = f"GraphCaptureError: {e}"
    finally:
        release.set()
    return out


@pytest.mark.parametrize("case", ["capture", "step"])
def test_a_stuck_rank_fails_rank_0_within_the_timeout(case):
    release = forkserver_context().Event()
    r0, r1 = run_ranks(_stuck_rank, 2, case, release, timeout_s=40)
    assert r1 == {"released": True, "model": True}
    limit = CONTROL_S if case == "capture" else STEP_S
    assert "elapsed" in r0, r0
    assert limit * 0.5 <= r0["elapsed"] < limit + 4, r0
    assert "a distributed rank failed" in r0["error"]
    assert r0["typed"]


def test_a_busy_spawned_worker_is_not_failed(monkeypatch):
    """A spawned worker's heartbeat may stall while it works (a call holding the GIL: a
    Triton compile, CUDA's start); its process handle says whether it died, so the monitor
    does not fail it (and abort the NCCL group under rank 0) for a stale counter. A rank it
    did not spawn (torchrun's) is failed by its stale counter, as before."""
    import multiprocessing

    from moska.distributed import rank_monitor

    monkeypatch.setattr(rank_monitor, "HEARTBEAT_S", 0.02)
    monkeypatch.setattr(rank_monitor, "HEARTBEAT_STALE_S", 0.2)
    store = SimpleNamespace(add=lambda key, n: 7, check=lambda keys: False)  # never beats
    groups = SimpleNamespace(store=store, world_size=3, backend="gloo")
    never, keep = multiprocessing.Pipe(duplex=False)  # a sentinel that never turns ready
    spawned = SimpleNamespace(sentinel=never, pid=None, exitcode=None, join=lambda t: None)
    monitor = rank_monitor.Monitor(groups, {1: spawned})  # type: ignore[arg-type]
    t0 = time.monotonic()
    monitor.start()
    try:
        while monitor.failure is None and time.monotonic() - t0 < 5:
            time.sleep(0.02)
    finally:
        monitor.stop()
        never.close()
        keep.close()
    assert monitor.failure is not None and monitor.failure.rank == 2  # torchrun's rank
    assert "no heartbeat" in str(monitor.failure)
    assert 0.2 <= time.monotonic() - t0 < 4
