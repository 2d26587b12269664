"""A rank other than 0: load its slice of the model, then run every forward rank 0 sends.

It owns no scheduler and no requests: each step's inputs and block tables arrive over the
StepChannel, its KV cache (its KV heads only) is written at the slots rank 0 chose, and it
takes part in the logits gather but never samples. It holds its KV heads of the library
builds rank 0 names (LOAD_LIBRARY / UNLOAD_LIBRARY; distributed/tp_library.py) and runs a
step's library groups over them. With NCCL it captures and replays the decode CUDA graphs
rank 0 names (GRAPH_CAPTURE / GRAPH_STEP; distributed/tp_graphs.py). It stops on STOP, or
when rank 0 goes away (its socket closes, or — for a worker it started — the pipe of its
ParentLink closes: distributed/rank_processes.py).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import threading
from collections.abc import Iterator

import torch

from moska.distributed.control_message import FOLLOW_TOKENS, Command
from moska.distributed.rank_monitor import HEARTBEAT_S
from moska.distributed.rank_processes import ParentLink
from moska.distributed.runtime import (
    ProcessGroups,
    Rendezvous,
    _torchrun_rendezvous,
    pick_backend,
    rank_device,
    stuck_dump_s,
    torchrun_rank,
)
from moska.distributed.step_channel import StepChannel
from moska.distributed.tensor_parallel import TensorParallel

logger = logging.getLogger(__name__)


def join_spawned(rdv: Rendezvous, rank: int, device) -> tuple[ProcessGroups, torch.device]:
    """A spawned rank's start (tensor-parallel worker or shared-KV rank): its log format,
    its device, its share of the host's cores on CPU, and its process groups."""
    logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(levelname)s %(message)s")
    os.environ.update(rdv.env)  # rank 0's MOSKA_* settings (TP graphs, timeouts)
    dev = rank_device(device, rank)
    if dev.type == "cpu":  # ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rdv.world_size))
    return ProcessGroups.join(rdv, rank), dev


def join_torchrun(world_size: int, device: str) -> tuple[ProcessGroups, torch.device]:
    """A rank other than 0 that torchrun started (decode context parallelism, Helix): its
    groups with rank 0's (the same backend rank 0 picks) and its device."""
    rank = torchrun_rank()
    assert rank is not None and rank != 0
    rdv = _torchrun_rendezvous(world_size, pick_backend(rank_device(device, 0), world_size))
    return ProcessGroups.join(rdv, rank, host_store=False), rank_device(device, rank)


def run_worker(rdv: Rendezvous, rank: int, parent: ParentLink, model_path, dtype, device, config):
    """Entry point of a spawned worker process."""
    groups, dev = join_spawned(rdv, rank, device)
    _serve(groups, model_path, dtype, dev, config, parent)


def run_worker_from_env(model_path, dtype, device: str, config) -> None:
    """Ranks other than 0 under torchrun: serve steps until rank 0 stops, then return."""
    rank = torchrun_rank()
    assert rank is not None and rank != 0
    world = config.tensor_parallel_size
    rdv = _torchrun_rendezvous(world, pick_backend(rank_device(device, rank), world))
    groups = ProcessGroups.join(rdv, rank, host_store=False)
    _serve(groups, model_path, dtype, rank_device(device, rank), config, None)


def _serve(
    groups: ProcessGroups, model_path, dtype, device: torch.device, config, parent, setup=None
):
    """Load this rank's slice and serve rank 0's steps; `setup(model, runner, channel)`,
    when given, returns the rank's libraries (shared-KV ranks beside tensor parallelism:
    distributed/tp_shared_kv.py)."""
    from moska.engine.runner import ModelRunner
    from moska.model import load_model

    with rank_lifecycle(groups, parent):
        if stuck_dump_s():  # diagnostics: a start that hangs too (serve_steps takes over)
            faulthandler.dump_traceback_later(stuck_dump_s())
        loaded = load_model(
            model_path, dtype=dtype, device=device, tensor_parallel=TensorParallel(groups.comm)
        )
        model = loaded.model
        runner = ModelRunner(loaded, config, device)  # its KV cache: this rank's heads
        channel = StepChannel(
            groups.comm, groups.control, device, model.config.hidden_size, model.dtype
        )
        libraries = None if setup is None else setup(model, runner, channel)
        serve_steps(model, runner.attention, channel, device, libraries, graphs=runner.graphs)


@contextlib.contextmanager
def rank_lifecycle(groups: ProcessGroups, parent: ParentLink | None) -> Iterator[None]:
    """A rank other than 0 while it serves: its heartbeat runs, it leaves when `parent` (rank
    0, which started it; None under torchrun) is gone, an error it dies of is left in the
    store for rank 0 to name, and it leaves the process group at the end (tensor-parallel
    workers and shared-KV ranks alike)."""
    if parent is not None:
        parent.adopt()
    if stuck_dump_s() > 0:  # diagnostics: rank 0 asks for the stacks before a kill
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(groups, parent, stop), name="moska-heartbeat", daemon=True
    )
    beat.start()
    stopped = False  # STOP received: every rank leaves the group together (teardown.py)
    try:
        yield
        stopped = True
    except BaseException as e:
        try:
            groups.store.set(f"moska/error/{groups.rank}", f"{type(e).__name__}: {e}")
        except Exception:  # rank 0 (the store) is gone: nobody to tell
            logger.debug("reporting the error to rank 0 failed", exc_info=True)
        raise
    finally:
        stop.set()
        beat.join(5.0)  # not inside a store call when the store goes (std::terminate)
        groups.close(clean=stopped)


@torch.inference_mode()
def serve_steps(
    model, attention, channel: StepChannel, device: torch.device, libraries=None, graphs=None
) -> None:
    """Run the commands rank 0 sends until STOP. `libraries`: the builds this rank holds
    (WorkerLibraries of its TP heads by default; Helix passes its own). `graphs`: this
    rank's TensorParallelGraphs (None: eager; GRAPH_CAPTURE is then answered with why)."""
    from moska.distributed.tp_library import WorkerLibraries

    libraries = WorkerLibraries(model, device) if libraries is None else libraries
    last = None  # the last forward's hidden states [T, H]
    stuck = stuck_dump_s()  # diagnostics: the stacks of a command that does not end
    while True:
        if stuck:
            faulthandler.cancel_dump_traceback_later()
        msg = channel.recv()  # idle: no timeout (rank 0 may idle; it is watched otherwise)
        if stuck:
            faulthandler.dump_traceback_later(stuck)
        if msg.command is Command.STOP:
            if stuck:
                faulthandler.cancel_dump_traceback_later()
            return
        if msg.command is Command.FORWARD:
            assert msg.meta is not None
            msg.meta.groups.extend(_groups(libraries, msg.groups or []))
            last = model(msg.input_ids, msg.positions, attention.bind(msg.meta))
            _follow(model, msg.logits_follow, last)  # rank 0 asks for them next
        elif msg.command is Command.GRAPH_STEP:
            assert graphs is not None and msg.meta is not None, "GRAPH_STEP without graphs"
            m = msg.meta
            last = graphs.replay_for_peer(
                msg.bucket, msg.positions, m.slot_mapping, m.seq_lens, m.block_tables
            )
            _follow(model, msg.logits_follow, last)
        elif msg.command is Command.GRAPH_CAPTURE:  # agree first: no rank captures alone
            why = "it runs eagerly" if graphs is None else graphs.can_capture(msg.bucket)
            if not channel.agree(why):
                assert graphs is not None
                channel.answer(graphs.capture_for_peer(msg.bucket))
        elif msg.command is Command.LOAD_LIBRARY:
            info = msg.info or {}
            channel.answer_load(libraries.load(info["root"], info["name"], info["build"]))
        elif msg.command is Command.UNLOAD_LIBRARY:
            libraries.unload((msg.info or {})["build"])
        elif msg.command is Command.PLACE_LIBRARY:  # shared-KV ranks' new chunk placement
            place = getattr(libraries, "place", None)
            channel.answer_load("no shared-KV ranks" if place is None else place(msg.info))
        elif msg.command is Command.LOGITS_LAST:
            assert last is not None, "LOGITS_LAST before any forward"
            model.compute_logits(last)
        elif msg.command is Command.LOGITS_ROWS:
            model.compute_logits(msg.hidden)


def _follow(model, kind: int, last: torch.Tensor) -> None:
    """What a forward's header said rank 0 asks of every row next: the logits, or (every
    row greedy) only the argmax tokens, whose gather is [N, 2] instead of [N, V/n]."""
    if kind == FOLLOW_TOKENS:
        model.greedy_tokens(last)
    elif kind:
        model.compute_logits(last)


def _groups(libraries, described: list) -> list:
    """The step's LibraryGroups over this rank's copies of the builds rank 0 named."""
    from moska.attention.metadata import LibraryGroup
    from moska.routing.policy import RoutingPolicy

    groups = []
    for g, rows in described:
        policy = g["policy"]
        groups.append(
            LibraryGroup(
                library=libraries.get(g["build"]),
                rows=rows,
                top_k=g["top_k"],
                scorer=g["scorer"],
                policy=None if policy is None else RoutingPolicy.from_dict(policy),
                all_rows=g["all_rows"],
            )
        )
    return groups


def _heartbeat(groups: ProcessGroups, parent: ParentLink | None, stop: threading.Event) -> None:
    """Bump this rank's counter in the store (rank 0's monitor watches it); leave the
    process when rank 0, which started it, is gone (nobody will send STOP)."""
    key = f"moska/heartbeat/{groups.rank}"
    while not stop.wait(HEARTBEAT_S):
        if parent is not None and parent.parent_gone():
            os._exit(1)
        try:
            groups.store.add(key, 1)
        except Exception:  # noqa: BLE001 - the store lives in rank 0: it is gone
            os._exit(1)
