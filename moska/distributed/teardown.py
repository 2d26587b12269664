"""Leaving a process group in bounded time, on every rank alike.

NCCL's teardown is not local: `destroy_process_group` finalizes and destroys the
communicator (ncclCommFinalize + ncclCommDestroy), which (1) waits until every CUDA graph
that captured one of its collectives is destroyed (NCCL keeps a reference per captured
plan: pytorch/pytorch#115388) and (2) waits for the communicator's peers, which must
destroy theirs too. Rank 0 used to join its workers for 10 s *before* destroying (a worker
sat in its destroy waiting for rank 0's), then killed them and waited in its own destroy
for a peer that was gone: a hang on every NCCL shutdown (gloo's destroy is local).

So every rank leaves the same way (`leave`):
1. its captured graphs are released (`tp_graphs.release_all`: device synchronized,
   graphs reset) — no graph keeps the communicator alive;
2. on a clean stop (rank 0 sent STOP, the others received it) the ranks meet on the gloo
   control group (a monitored barrier, bounded): every rank enters its destroy together;
3. the group is destroyed (clean) or aborted (a rank failed or did not meet: a destroy
   would wait for it), in a thread with a deadline; a destroy that does not return in
   time is logged with the threads' stacks and followed by an abort (bounded as well);
   one that still does not return is abandoned (logged) so that the process can leave.
Then rank 0 joins its workers (`runtime.DistributedRuntime.shutdown`).

Diagnostics: with MOSKA_DIST_STUCK_DUMP_S > 0 each step is logged at WARNING (which one
hangs, per rank).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def teardown_s() -> float:
    """MOSKA_DIST_TEARDOWN_S (10 s by default): each step of leaving the group (meeting,
    destroying, aborting) gives up after this long."""
    return float(os.environ.get("MOSKA_DIST_TEARDOWN_S", "10"))


def _say(rank: int, msg: str, *args: Any) -> None:
    diag = float(os.environ.get("MOSKA_DIST_STUCK_DUMP_S", "0")) > 0
    logger.log(logging.WARNING if diag else logging.DEBUG, f"rank {rank} teardown: {msg}", *args)


def release_graphs(device: torch.device | None = None) -> int:
    """Release every captured tensor-parallel CUDA graph of this process (none unless
    tp_graphs was imported: no graph was captured), after the device finished its work.
    Returns how many were released."""
    n = 0
    mod = sys.modules.get("moska.distributed.tp_graphs")
    if mod is not None:
        n = mod.release_all()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)  # no collective of this rank still in flight
    return n


def meet(control: Any, rank: int, deadline_s: float) -> bool:
    """Every rank of the control group (gloo) reaches this point before any leaves it;
    False when one did not within `deadline_s` (or the group is broken)."""
    try:
        dist.monitored_barrier(control, timeout=timedelta(seconds=deadline_s))
    except Exception as e:  # noqa: BLE001 - a rank that did not come: abort instead
        logger.warning("rank %d teardown: not every rank reached the teardown: %s", rank, e)
        return False
    return True


def bounded(fn: Callable[[], Any], deadline_s: float, name: str) -> bool:
    """Run fn in a daemon thread; True when it returned (or raised: logged) within
    `deadline_s`. (The torch calls used here release the GIL while they wait.)"""
    done = threading.Event()

    def run() -> None:
        try:
            fn()
        except Exception:  # a broken group: nothing left to tear down
            logger.debug("%s raised", name, exc_info=True)
        finally:
            done.set()

    try:
        threading.Thread(target=run, name=f"moska-{name}", daemon=True).start()
    except RuntimeError:  # no new thread at interpreter exit (an atexit shutdown): inline
        run()
    return done.wait(deadline_s)


def _abort() -> None:
    dist.distributed_c10d._abort_process_group()


def leave(
    rank: int,
    backend: str,
    control: Any,
    *,
    clean: bool,
    deadline_s: float | None = None,
    device: torch.device | None = None,
) -> str:
    """Leave the process group (all its groups) within bounded time: 'destroyed',
    'aborted', 'stuck' (abandoned: logged) or 'none' (no group). `clean`: every other rank
    is leaving too (STOP sent / received); otherwise a NCCL group is aborted, not
    destroyed (its destroy would wait for the rank that failed)."""
    if not dist.is_initialized():
        return "none"
    deadline_s = teardown_s() if deadline_s is None else deadline_s
    t0 = time.monotonic()
    try:
        n = release_graphs(device if backend == "nccl" else None)
    except Exception:  # a device error: the abort below still frees the comm
        logger.warning("rank %d teardown: releasing the CUDA graphs failed", rank, exc_info=True)
        n, clean = -1, False
    _say(rank, "%d CUDA graph(s) released; clean=%s", n, clean)
    if clean:
        clean = meet(control, rank, deadline_s)
        _say(rank, "met the other ranks: %s (%.1f s)", clean, time.monotonic() - t0)
    if clean or backend != "nccl":  # gloo's destroy is local: it cannot wait for a peer
        if bounded(dist.destroy_process_group, deadline_s, "destroy"):
            _say(rank, "destroyed (%.1f s)", time.monotonic() - t0)
            return "destroyed"
        logger.error(
            "rank %d: destroy_process_group did not return within %.0f s (%s backend, %d "
            "CUDA graphs released); aborting the communicators. Threads:",
            rank, deadline_s, backend, n,
        )  # fmt: skip
        faulthandler.dump_traceback(all_threads=True)
    if bounded(_abort, deadline_s, "abort"):
        _say(rank, "aborted (%.1f s)", time.monotonic() - t0)
        return "aborted"
    logger.error(
        "rank %d: aborting the process group did not return within %.0f s either; "
        "leaving it behind",
        rank, deadline_s,
    )  # fmt: skip
    return "stuck"
