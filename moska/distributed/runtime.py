"""The process group of a tensor-parallel engine: who starts the ranks, how they meet, and
how rank 0 notices one that died.

Layout (one host): rank 0 is the calling process — it owns the scheduler, and in `moska
serve` the HTTP server; ranks 1..N-1 are worker processes that only run forwards
(`distributed/worker.py`). Rank 0 starts them with multiprocessing (spawn by default:
`rank_processes.process_context`, a seam the tests fill with a forkserver), unless
the process was launched by `torchrun` (RANK / WORLD_SIZE / MASTER_ADDR in the
environment), in which case every rank is already running and ranks other than 0 become
workers.

They meet on a TCPStore (rank 0 binds a free port; under torchrun the launcher's). Two
groups: the *model* group (NCCL on GPUs, gloo on CPU or when ranks share a GPU) carries the
collectives of the forward, each with the group's timeout (MOSKA_DIST_TIMEOUT_S, 60 s by
default: a long first step may compile kernels); the gloo *control* group carries each
step's command header, and the workers wait on it for as long as rank 0 is idle. Rank 0's
side of the control group has a timeout (MOSKA_DIST_CONTROL_TIMEOUT_S, 300 s by default: a
worker loading a large library answers late), so that a worker that stops answering (alive,
its heartbeat running, but stuck in a capture or a command) makes rank 0 raise
RankFailedError instead of waiting forever; a gloo group's timeout is each process's own.

Failure: workers beat a heartbeat counter in the store and rank 0 watches them
(`rank_monitor.py`); a failed rank is logged by rank, and the engine raises
RankFailedError naming it at its next step or request.

Shutdown: STOP, then every rank leaves the groups together and in bounded time (a NCCL
destroy waits for its peers and for captured graphs: `teardown.py`), then rank 0 joins the
workers; after a failure the workers are killed and a NCCL group is aborted.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moska.distributed.comm import Collectives
from moska.distributed.errors import RankFailedError
from moska.distributed.rank_monitor import Monitor, process_identity
from moska.distributed.rank_processes import open_parent_link, process_context

logger = logging.getLogger(__name__)

_IDLE_TIMEOUT = timedelta(days=30)  # the control group: workers wait on it while rank 0 idles


def collective_timeout_s() -> float:
    return float(os.environ.get("MOSKA_DIST_TIMEOUT_S", "60"))


def control_timeout_s() -> float:
    """Rank 0's wait for the other ranks on the control group (their answers, agreements)."""
    return float(os.environ.get("MOSKA_DIST_CONTROL_TIMEOUT_S", "300"))


def torchrun_rank() -> int | None:
    """This process's rank when `torchrun` launched it (None otherwise)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"])
    return None


def pick_backend(device: torch.device, world_size: int) -> str:
    """NCCL when each rank has a GPU of its own; gloo on CPU or when ranks share a GPU
    (NCCL refuses two ranks on one device). MOSKA_DIST_BACKEND overrides."""
    forced = os.environ.get("MOSKA_DIST_BACKEND")
    if forced:
        return forced
    if device.type == "cuda" and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r's device: cuda:(r mod visible GPUs) on CUDA (several ranks share a GPU when
    there are fewer GPUs than ranks: a logic run), else the CPU."""
    if not str(device).startswith("cuda"):
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", rank))
    return torch.device("cuda", local % max(1, torch.cuda.device_count()))


@dataclass
class Rendezvous:
    """Where the ranks meet and how they talk (picklable: handed to spawned workers)."""

    world_size: int
    host: str
    port: int
    backend: str
    use_agent_store: bool = False  # torchrun's agent hosts the store
    # tensor parallelism beside shared-KV ranks: ranks 0..model_ranks-1 form the model's
    # group (model_backend) inside the world, whose default group carries the shared-KV
    # exchange; 0: every rank is in the model group (the default group)
    model_ranks: int = 0
    model_backend: str = ""
    # rank 0's MOSKA_* settings, which a rank it starts takes (join_spawned): a rank forked
    # from a forkserver would otherwise have the server's environment, not rank 0's
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ProcessGroups:
    """One rank's membership: model collectives, control group, store."""

    rank: int
    world_size: int
    comm: Collectives  # the model's collectives (a subgroup when rdv.model_ranks)
    control: Any  # a gloo ProcessGroup
    store: dist.Store
    backend: str  # "nccl" when any of its groups is

    @classmethod
    def join(cls, rdv: Rendezvous, rank: int, *, host_store: bool = False) -> ProcessGroups:
        timeout = timedelta(seconds=collective_timeout_s())
        store = dist.TCPStore(
            rdv.host,
            rdv.port,
            rdv.world_size,
            is_master=host_store,
            timeout=timedelta(seconds=max(120.0, collective_timeout_s())),
            wait_for_workers=False,
        )
        # rank 0 waits for this, watching the process; its value lets rank 0 watch a torchrun
        # rank's process by a pidfd (rank_monitor.process_identity)
        store.set(f"moska/up/{rank}", process_identity())
        return cls._init(rdv, rank, store, timeout)

    @classmethod
    def _init(cls, rdv: Rendezvous, rank: int, store, timeout: timedelta) -> ProcessGroups:
        if "nccl" in (rdv.backend, rdv.model_backend):
            torch.cuda.set_device(rank_device("cuda", rank))
        dist.init_process_group(
            rdv.backend,
            store=dist.PrefixStore("moska/pg", store),
            rank=rank,
            world_size=rdv.world_size,
            timeout=timeout,
        )
        # workers wait on it while rank 0 idles; rank 0 waits only for answers: bounded
        idle = timedelta(seconds=control_timeout_s()) if rank == 0 else _IDLE_TIMEOUT
        control = dist.new_group(backend="gloo", timeout=idle)
        # every rank is up and answering (gloo names a rank that is not)
        dist.monitored_barrier(control, timeout=timeout, wait_all_ranks=True)
        comm = Collectives(None, rank, rdv.world_size, rdv.backend)
        backend = rdv.backend
        n = rdv.model_ranks
        if 0 < n < rdv.world_size:  # every rank creates the subgroup, members use it
            model = dist.new_group(list(range(n)), backend=rdv.model_backend, timeout=timeout)
            comm = Collectives(model if rank < n else None, rank, n, rdv.model_backend)
            backend = "nccl" if "nccl" in (backend, rdv.model_backend) else backend
        return cls(rank, rdv.world_size, comm, control, store, backend)

    def close(self, clean: bool = False, deadline_s: float | None = None) -> str:
        """Leave the groups in bounded time (distributed/teardown.py): `clean` when every
        rank leaves now (STOP sent / received): they meet, then destroy; otherwise a NCCL
        group is aborted. Returns teardown.leave's outcome."""
        from moska.distributed.teardown import leave

        device = rank_device("cuda", self.rank) if self.backend == "nccl" else None
        return leave(
            self.rank, self.backend, self.control, clean=clean, deadline_s=deadline_s, device=device
        )


class DistributedRuntime:
    """Rank 0's side of a tensor-parallel engine: start (or join) the ranks, watch them,
    stop them."""

    def __init__(
        self, groups: ProcessGroups, monitor: Monitor, parent_end: Connection | None = None
    ) -> None:
        self.groups = groups
        self.monitor = monitor
        self._parent_end = parent_end  # open while the workers run: see rank_processes
        self.channel: Any = None  # the StepChannel, set once the model is loaded
        self.shared_kv: Any = None  # rank 0's SharedKVAttention beside TP (tp_shared_kv.py)
        self._closed = False
        self.teardown: str | None = None  # how rank 0 left the group (teardown.leave)
        atexit.register(self.shutdown)

    @property
    def world_size(self) -> int:
        return self.groups.world_size

    @property
    def worker_pids(self) -> dict[int, int]:
        """rank -> pid of the workers this process spawned."""
        return {r: p.pid for r, p in self.monitor.procs.items() if p.pid is not None}

    @classmethod
    def start(
        cls,
        world_size: int,
        device: str,
        worker_args: tuple,
        target: Any = None,
        model_ranks: int = 0,
    ) -> DistributedRuntime:
        """Rank 0: start ranks 1..world_size-1 running target(rdv, rank, ParentLink,
        *worker_args) (worker.run_worker by default; shared-KV ranks run their own) — or,
        under torchrun, join the ranks it started — and form the groups. `model_ranks` >
        0: ranks 0..model_ranks-1 form the model's group (Rendezvous.model_ranks)."""
        from moska.distributed.worker import run_worker

        target = run_worker if target is None else target
        backend = pick_backend(rank_device(device, 0), world_size)
        model_backend = pick_backend(rank_device(device, 0), model_ranks) if model_ranks else ""
        launched = torchrun_rank()
        procs: dict[int, Any] = {}  # rank -> a spawned multiprocessing Process
        parent_end = None  # the write end of the ranks' ParentLink
        if launched is not None:
            rdv = _torchrun_rendezvous(world_size, backend, model_ranks, model_backend)
            groups = ProcessGroups.join(rdv, 0, host_store=not rdv.use_agent_store)
        else:
            store = dist.TCPStore(
                "127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                timeout=timedelta(seconds=max(120.0, collective_timeout_s())),
            )  # fmt: skip
            moska = {k: v for k, v in os.environ.items() if k.startswith("MOSKA_")}
            rdv = Rendezvous(
                world_size, "127.0.0.1", store.port, backend, env=moska,
                model_ranks=model_ranks, model_backend=model_backend,
            )  # fmt: skip
            ctx = process_context()
            parent_end, link = open_parent_link(ctx)
            try:
                for rank in range(1, world_size):
                    p = ctx.Process(  # type: ignore[attr-defined]
                        target=target,
                        args=(rdv, rank, link, *worker_args),
                        name=f"moska-tp-rank{rank}",
                        daemon=True,
                    )
                    p.start()
                    procs[rank] = p
                link.reader.close()  # the ranks hold it now
                _wait_until_up(store, procs)
                groups = ProcessGroups._init(
                    rdv, 0, store, timedelta(seconds=collective_timeout_s())
                )
            except BaseException:
                _stop_procs(procs, 0.0)
                parent_end.close()
                raise
        monitor = Monitor(groups, procs)
        monitor.start()
        return cls(groups, monitor, parent_end)

    @property
    def failure(self) -> RankFailedError | None:
        """The monitor's failure, else the control group's (StepChannel.failure), else None."""
        return self.monitor.failure or getattr(self.channel, "failure", None)

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure

    def failure_after(self, exc: BaseException, wait_s: float = 3.0) -> RankFailedError | None:
        """After a step raised `exc`: the rank failure behind it, waiting up to `wait_s` for
        the monitor to name the rank (Monitor.await_failure: a torchrun rank on another host
        by its stopped heartbeat); None when `exc` is not a distributed failure. (The
        control group's failures come as RankFailedError naming no rank: the monitor's,
        which names it, is preferred.)"""
        if isinstance(exc, RankFailedError) and exc.rank is not None:
            return exc
        if not isinstance(exc, RuntimeError | dist.DistError):
            return None
        if wait_s > 0:
            self.monitor.await_failure(wait_s)
        if self.monitor.failure is None and isinstance(exc, RankFailedError):
            self.monitor.failure = exc
            logger.error("tensor-parallel rank failed, none known dead: %s", exc)
        elif self.monitor.failure is None and _looks_distributed(exc):
            self.monitor.failure = RankFailedError(None, f"a collective failed ({exc})")
            logger.error("tensor-parallel collective failed with no rank known dead: %s", exc)
        return self.monitor.failure

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (a STOP command; every rank then leaves the process group
        together, each step bounded: distributed/teardown.py) and kill what has not exited
        within `timeout_s`. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.monitor.stop()
        failed = self.failure is not None
        stopped = False
        if not failed and self.channel is not None:
            try:
                self.channel.send_stop()
                stopped = True
            except Exception:  # a worker died meanwhile: they are killed below, at once
                logger.debug("sending STOP failed", exc_info=True)
                failed = True
        if stopped:
            # every rank leaves the group now, together: a NCCL destroy waits for its peers'
            # (rank 0 joining the workers first deadlocked: teardown.py); then they exit
            self.teardown = self.groups.close(clean=True)  # MOSKA_DIST_TEARDOWN_S per step
            _stop_procs(self.monitor.procs, timeout_s)
        else:
            # after a rank failed no STOP was sent: the survivors wait on the control group
            # and would never exit on their own, so they are killed at once instead of
            # after timeout_s; the group is then aborted (a destroy would wait for them)
            _stop_procs(self.monitor.procs, 0.0 if failed else timeout_s)
        if self._parent_end is not None:  # any worker still running leaves on its own
            self._parent_end.close()
        if not stopped:
            self.teardown = self.groups.close(clean=False)


def _looks_distributed(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, dist.DistError) or any(
        w in text for w in ("gloo", "nccl", "connection", "peer", "timed out", "timeout")
    )


def _wait_until_up(store, procs: dict[int, mp.Process]) -> None:
    """Wait until every spawned worker has reached the store (imports done), failing at
    once, with the rank, when one exits first (init_process_group would wait its timeout)."""
    deadline = time.monotonic() + max(120.0, collective_timeout_s())
    waiting = set(procs)
    while waiting:
        for rank in sorted(waiting):
            p = procs[rank]
            if store.check([f"moska/up/{rank}"]):
                waiting.discard(rank)
            elif not p.is_alive():
                p.join(1.0)
                raise RankFailedError(rank, f"it exited while starting (exit code {p.exitcode})")
        if time.monotonic() > deadline:
            raise RankFailedError(min(waiting), "it did not start within its timeout")
        time.sleep(0.05)


def stuck_dump_s() -> float:
    """MOSKA_DIST_STUCK_DUMP_S (diagnostics; 0, off, by default): a worker still inside one
    command after that many seconds writes its threads' Python stacks to stderr
    (faulthandler), and a worker that rank 0 must kill writes them first (SIGUSR1)."""
    return float(os.environ.get("MOSKA_DIST_STUCK_DUMP_S", "0"))


def _stop_procs(procs: dict[int, mp.Process], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs.values():
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs.values() if p.is_alive()]
    if alive and stuck_dump_s() > 0:  # where each was stuck, before it goes
        for p in alive:
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGUSR1)  # type: ignore[arg-type]
        time.sleep(0.5)
    for p in alive:
        p.kill()
        p.join(5.0)


def _torchrun_rendezvous(
    world_size: int, backend: str, model_ranks: int = 0, model_backend: str = ""
) -> Rendezvous:
    env_world = int(os.environ["WORLD_SIZE"])
    if env_world != world_size:
        from moska.distributed.errors import TensorParallelConfigError

        what = "tensor_parallel_size + shared_kv_ranks" if model_ranks else "tensor_parallel_size"
        raise TensorParallelConfigError(
            f"torchrun started {env_world} processes but {what} is {world_size}; pass "
            f"--nproc-per-node {world_size}"
        )
    return Rendezvous(
        world_size,
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        backend,
        use_agent_store=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        model_ranks=model_ranks,
        model_backend=model_backend,
    )
