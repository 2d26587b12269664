"""How rank 0 notices a tensor-parallel rank that died (the `Monitor` of
`DistributedRuntime`, `runtime.py`).

Each worker bumps a heartbeat counter in the store every 0.5 s, and leaves when
rank 0 is gone (the pipe of its `ParentLink` closes); a monitor thread on rank 0 watches the
process handles of the workers it spawned (a dead process is seen at once) and the counters
of the ranks it did not (torchrun's; stale for HEARTBEAT_STALE_S = 5 s: failed). A spawned
worker's stale counter is no failure: a call holding the GIL (a Triton compile, CUDA's start)
starves its heartbeat thread, and a failure aborts the NCCL group under rank 0's running
work; a stuck one meets the timeouts. A failed rank is logged by rank, and the engine raises
RankFailedError naming it at its next step or request. A collective with a dead peer raises at once on gloo (the peer's socket closes);
on NCCL the monitor aborts the model group so that a collective blocked on the dead rank
returns an error instead of hanging.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import torch.multiprocessing as mp

from moska.distributed.errors import RankFailedError

if TYPE_CHECKING:
    from moska.distributed.runtime import ProcessGroups

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
HEARTBEAT_STALE_S = 5.0


@dataclass
class Monitor:
    """Rank 0's watch over the other ranks (see this module's docstring)."""

    groups: ProcessGroups
    procs: dict[int, mp.Process] = field(default_factory=dict)  # spawned workers by rank
    failure: RankFailedError | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="moska-rank-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and wait for the thread: it must not be inside a store call when
        the store is destroyed (std::terminate at exit)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _run(self) -> None:
        store = self.groups.store
        ranks = range(1, self.groups.world_size)
        seen = {r: (-1, time.monotonic()) for r in ranks}
        while not self._stop.is_set() and self.failure is None:
            sentinels: dict[Any, int] = {p.sentinel: r for r, p in self.procs.items()}
            if sentinels:
                ready = multiprocessing.connection.wait(list(sentinels), timeout=HEARTBEAT_S)
            else:
                ready = []
                self._stop.wait(HEARTBEAT_S)
            for s in ready:
                r = sentinels[s]
                self.procs[r].join(1.0)  # reap it: its exit code (-9: killed by SIGKILL)
                self._fail(r, f"its process exited (exit code {self.procs[r].exitcode})")
                return
            now = time.monotonic()
            for r in ranks:
                try:
                    beats = store.add(f"moska/heartbeat/{r}", 0)
                except Exception as e:  # noqa: BLE001 - the store itself is gone
                    self._fail(r, f"the rendezvous store stopped answering ({e})")
                    return
                if beats != seen[r][0] or r in self.procs:  # spawned: its handle tells
                    seen[r] = (beats, now)
                elif beats >= 0 and now - seen[r][1] > HEARTBEAT_STALE_S:
                    self._fail(r, f"no heartbeat for {now - seen[r][1]:.1f} s")
                    return

    def _fail(self, rank: int, reason: str) -> None:
        with self._lock:
            if self.failure is not None:
                return
            key = f"moska/error/{rank}"
            try:  # get() would wait for the key: check first
                if self.groups.store.check([key]):
                    reason = f"{reason}: {self.groups.store.get(key).decode()}"
            except Exception:  # the store is gone with rank 0's peers
                logger.debug("reading rank %d's error failed", rank, exc_info=True)
            self.failure = RankFailedError(rank, reason)
        logger.error("distributed rank %d failed: %s", rank, reason)
        if self.groups.backend == "nccl":  # unblock a collective waiting on the dead rank
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception:  # best effort; the NCCL watchdog times out too
                logger.debug("aborting the NCCL group failed", exc_info=True)
