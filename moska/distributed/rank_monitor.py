"""How rank 0 notices a tensor-parallel rank that died (the `Monitor` of
`DistributedRuntime`, `runtime.py`).

Each worker bumps a heartbeat counter in the store every 0.5 s, and leaves when
rank 0 is gone (the pipe of its `ParentLink` closes); a monitor thread on rank 0 watches the
process handles of the workers it spawned (a dead process is seen at once) and the counters
of the ranks it did not (torchrun's; stale for HEARTBEAT_STALE_S = 5 s: failed). A torchrun
rank on rank 0's host is watched by its process too (a pidfd: each rank leaves its host, pid
and start time in the store, `process_identity`), so it is named at once as well. Once a
collective has failed (`await_failure`), a rank watched only by its heartbeat (another
host's) is named after STALLED_BEATS heartbeats without a beat; one whose counter moves is
alive, only slow, and never named. A spawned
worker's stale counter is no failure: a call holding the GIL (a Triton compile, CUDA's start)
starves its heartbeat thread, and a failure aborts the NCCL group under rank 0's running
work; a stuck one meets the timeouts. A failed rank is logged by rank, and the engine raises
RankFailedError naming it at its next step or request. A collective with a dead peer raises at once on gloo (the peer's socket closes);
on NCCL the monitor aborts the model group so that a collective blocked on the dead rank
returns an error instead of hanging.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import os
import socket
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
STALLED_BEATS = 3  # after a collective failed: this many heartbeats missed name a rank


def process_identity() -> str:
    """'host pid start-time' of this process, which it leaves in the store (moska/up/RANK)
    for rank 0 to watch it by a pidfd; the start time (/proc, "" elsewhere) tells a reused
    pid, or another pid namespace's, from this process."""
    return f"{socket.gethostname()} {os.getpid()} {_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:  # field 22, after the parenthesised name
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _open_pidfd(identity: str) -> int | None:
    """A pidfd of the process that left `identity` (readable once it exits), when it runs
    on this host and is still that process; None otherwise (heartbeats only)."""
    host, pid, start = (identity.split() + ["", "", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit() or not start:
        return None
    try:
        fd = os.pidfd_open(int(pid))
    except (OSError, AttributeError):  # gone already, or no pidfd (not Linux >= 5.3)
        return None
    if _start_time(int(pid)) != start:  # another process has that pid now
        os.close(fd)
        return None
    return fd


@dataclass
class Monitor:
    """Rank 0's watch over the other ranks (see this module's docstring)."""

    groups: ProcessGroups
    procs: dict[int, mp.Process] = field(default_factory=dict)  # spawned workers by rank
    failure: RankFailedError | None = None
    pidfds: dict[int, int] = field(default_factory=dict)  # torchrun ranks on this host
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
        try:
            self._watch()
        finally:
            for fd in self.pidfds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _watch(self) -> None:
        store = self.groups.store
        ranks = range(1, self.groups.world_size)
        self._open_pidfds(ranks)
        seen = {r: (-1, time.monotonic()) for r in ranks}
        while not self._stop.is_set() and self.failure is None:
            sentinels: dict[Any, int] = {p.sentinel: r for r, p in self.procs.items()}
            sentinels.update({fd: r for r, fd in self.pidfds.items()})
            if sentinels:
                ready = multiprocessing.connection.wait(list(sentinels), timeout=HEARTBEAT_S)
            else:
                ready = []
                self._stop.wait(HEARTBEAT_S)
            for s in ready:
                r = sentinels[s]
                if r not in self.procs:  # torchrun's: its parent, the agent, has its code
                    self._fail(r, "its process exited")
                    return
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

    def _open_pidfds(self, ranks: range) -> None:
        for r in ranks:
            if r in self.procs:
                continue
            key = f"moska/up/{r}"  # process_identity, left by ProcessGroups.join
            try:  # get() would wait for the key: check first
                up = self.groups.store.check([key])
                fd = _open_pidfd(self.groups.store.get(key).decode()) if up else None
            except Exception:  # noqa: BLE001 - the heartbeats still watch it
                fd = None
            if fd is not None:
                self.pidfds[r] = fd

    def await_failure(self, wait_s: float) -> RankFailedError | None:
        """After a collective failed: wait up to `wait_s` for a rank to be named. A rank
        watched only by its heartbeat (not spawned here, not on this host) would wait
        HEARTBEAT_STALE_S; here one whose counter stays still for STALLED_BEATS heartbeats
        from now is named, and one whose counter moves (alive, only slow) never is."""
        start = time.monotonic()
        window = STALLED_BEATS * HEARTBEAT_S
        ranks = range(1, self.groups.world_size)
        suspects = {
            r: self._beats(r) for r in ranks if r not in self.procs and r not in self.pidfds
        }
        while self.failure is None and time.monotonic() - start < wait_s:
            for r in list(suspects):
                beats = self._beats(r)
                if beats is None or beats != suspects[r]:
                    del suspects[r]  # it beats: alive (no store: the monitor names a rank)
            if suspects and time.monotonic() - start >= window:
                r, *others = sorted(suspects)
                also = f" (nor from rank(s) {', '.join(map(str, others))})" if others else ""
                self._fail(r, f"no heartbeat for {window:.1f} s after a collective failed{also}")
                break
            time.sleep(min(0.05, HEARTBEAT_S / 4))
        return self.failure

    def _beats(self, rank: int) -> int | None:
        try:
            return self.groups.store.add(f"moska/heartbeat/{rank}", 0)
        except Exception:  # noqa: BLE001 - the store is gone: the monitor says so
            return None

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
