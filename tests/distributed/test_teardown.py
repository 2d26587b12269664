"""Leaving a process group is bounded and ordered (issue #18; moska/distributed/teardown.py).

NCCL's destroy is collective (each rank's waits for its peers') and waits for captured CUDA
graphs; a NCCL TP engine's shutdown hung on the H200s because rank 0 joined its workers
before destroying (a worker waited in its destroy for rank 0's, was killed, and rank 0's
destroy then waited for it forever). Here, on gloo, destroy is made collective the way
NCCL's is (each rank's waits until every rank has entered one), and:

- ranks that all leave cleanly meet, destroy and return at once;
- a rank whose peer never comes gives up meeting and destroying at its deadline, aborts,
  and returns (it waited forever before);
- rank 0's shutdown leaves the group before it joins the workers, and after a failure
  kills them first and aborts;
- TensorParallelGraphs.release drops every graph (a CUDA graph is reset) and refuses
  further captures.
"""

from __future__ import annotations

import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from gloo_ranks import forkserver_context, run_ranks

pytestmark = pytest.mark.timeout(60)

DEADLINE_S = 0.5  # each teardown step's deadline when a peer never comes
CLEAN_S = 5.0  # ... when all leave (met and destroyed well within it, or aborted after it)


def _collective_destroy(store, world: int) -> None:
    """dist.destroy_process_group made collective, as NCCL's: it returns only once every
    rank has entered one (the store's wait has its own timeout: a thread left waiting ends)."""
    import torch.distributed as dist

    plain = dist.destroy_process_group

    def destroy(group=None) -> None:
        store.add("entered-destroy", 1)
        deadline = time.monotonic() + 20
        while store.add("entered-destroy", 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
        plain(group)

    dist.destroy_process_group = destroy


def _leave(rank: int, world: int, case: str, done) -> dict:
    """Rank 0 leaves cleanly; rank 1 leaves cleanly too ("clean") or never comes until
    rank 0 is done ("absent")."""
    import torch.distributed as dist

    from moska.distributed.runtime import ProcessGroups, Rendezvous
    from moska.distributed.teardown import leave

    port, store = torch.zeros(1, dtype=torch.int64), None
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
        port[0] = store.port
    dist.broadcast(port, 0)
    dist.destroy_process_group()  # run_ranks' group: the runtime's own groups instead
    rdv = Rendezvous(world, "127.0.0.1", int(port), "gloo")
    if rank == 0:
        groups = ProcessGroups._init(rdv, 0, store, timedelta(seconds=20))
    else:
        groups = ProcessGroups.join(rdv, rank)
    _collective_destroy(groups.store, world)
    if case == "absent" and rank == 1:
        done.wait(30)
        return {"left": leave(rank, "gloo", groups.control, clean=False, deadline_s=5)}
    t0 = time.monotonic()
    deadline = CLEAN_S if case == "clean" else DEADLINE_S
    left = leave(rank, "gloo", groups.control, clean=True, deadline_s=deadline)
    done.set()
    return {"left": left, "elapsed": time.monotonic() - t0, "up": dist.is_initialized()}


def test_ranks_that_leave_together_destroy_at_once():
    r0, r1 = run_ranks(_leave, 2, "clean", forkserver_context().Event(), timeout_s=40)
    for r in (r0, r1):
        assert r["left"] == "destroyed" and not r["up"], r
        assert r["elapsed"] < CLEAN_S / 2, r


def test_a_peer_that_never_comes_is_given_up_at_the_deadline():
    r0, r1 = run_ranks(_leave, 2, "absent", forkserver_context().Event(), timeout_s=40)
    # meeting gave up at the deadline, the (collective) destroy at the next one: aborted
    assert r0["left"] == "aborted" and not r0["up"], r0
    assert 2 * DEADLINE_S * 0.9 <= r0["elapsed"] < 2 * DEADLINE_S + 4, r0
    assert r1["left"] in ("destroyed", "aborted"), r1


class _Proc:
    def __init__(self, log: list) -> None:
        self.log, self.pid = log, None

    def join(self, timeout=None) -> None:
        self.log.append("join")

    def is_alive(self) -> bool:
        return False


def _runtime(failure=None):
    from moska.distributed.runtime import DistributedRuntime

    log: list = []
    groups = SimpleNamespace(world_size=2, close=lambda clean: log.append(("close", clean)) or "ok")
    monitor = SimpleNamespace(stop=lambda: None, failure=failure, procs={1: _Proc(log)})
    rt = DistributedRuntime(groups, monitor)  # type: ignore[arg-type]
    rt.channel = SimpleNamespace(send_stop=lambda: log.append("stop"), failure=None)
    return rt, log


def test_rank_0_leaves_the_group_before_it_joins_the_workers():
    rt, log = _runtime()
    rt.shutdown(timeout_s=1.0)
    assert log == ["stop", ("close", True), "join"]
    assert rt.teardown == "ok"
    rt.shutdown()  # twice: nothing more
    assert log == ["stop", ("close", True), "join"]


def test_after_a_failure_rank_0_kills_the_workers_then_aborts():
    from moska.distributed.errors import RankFailedError

    rt, log = _runtime(failure=RankFailedError(1, "it died"))
    rt.shutdown(timeout_s=1.0)
    assert log == ["join", ("close", False)]  # no STOP: nobody would answer it


def test_release_resets_every_graph_and_refuses_captures():
    from moska.distributed import tp_graphs
    from moska.engine.cuda_graphs import GraphCaptureError

    cpu = torch.device("cpu")
    g = tp_graphs.TensorParallelGraphs(
        model=SimpleNamespace(driver=None), attention=None, scratch_block=9, block_size=16,
        max_blocks=4, max_batch=4, device=cpu,
    )  # fmt: skip
    assert g in tp_graphs._LIVE  # release_all reaches it
    resets: list[int] = []
    for b in g.buckets:  # a reset-able graph per bucket, as a captured CUDAGraph
        graph = SimpleNamespace(reset=lambda b=b: resets.append(b))
        g._graphs[(b,)] = SimpleNamespace(graph=graph, keep=[object()])  # type: ignore[assignment]
    assert g.release() == len(g.buckets)
    assert sorted(resets) == g.buckets and not g._graphs and g._pool is None
    assert g.can_capture(1) is not None  # a peer refuses GRAPH_CAPTURE
    with pytest.raises(GraphCaptureError, match="shut down"):
        g._get(1, None)
    assert g.release() == 0
