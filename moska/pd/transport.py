"""KV transfer between prefill and decode instances over torch.distributed (gloo; no
transport of our own).

Every instance of a prefill/decode cluster is one rank of a transfer group (P + D ranks;
rank 0 hosts the TCPStore the others meet on). The group is a `ProcessGroupGloo` built
directly (no global default group, so several ranks may live in one process, as in the
tests). A transfer is:

- its header, a small JSON (transfer id, prompt tokens of the blocks, namespace, layout),
  set in the store under `moska/pd/hdr/SRC->DST/SEQ` (SEQ counts that pair's transfers);
  the decode instance keeps one thread per source checking for the next key (every 1 to
  20 ms), so no thread is ever parked in a receive nobody will answer (gloo cannot wake
  one, and one left at exit aborts the process);
- its KV, one point-to-point message per layer (`[2, n_blocks, block_size, Hkv, D]`: K and
  V) tagged with SEQ, each bounded by the data timeout. A prefill instance hands over a
  `stream.LayerStream` that its prefill step is still filling: the header goes out at
  once and each layer as soon as the step computed it (the transfer overlaps the rest of
  the prefill).

One sender thread per destination and one receiver thread per source keep a pair's
transfers in order. A failed send is retried once (under a new SEQ); then the transfer is
marked failed and the front end re-prefills for another decode instance or fails the
request. On GPUs the KV is staged through host memory (gloo): a logic path; NCCL
point-to-point is not wired up yet.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from moska.pd.errors import TransferFailedError
from moska.pd.stream import LayerStream

logger = logging.getLogger(__name__)

_MEET = timedelta(seconds=300)  # how long ranks wait for each other at startup
_POLL_MAX_S = 0.02  # a receiver checks the store for the next header at least this often
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


@dataclass(frozen=True)
class TransferEndpoint:
    """Where the transfer group meets and this instance's place in it."""

    host: str
    port: int
    rank: int
    world_size: int
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"--pd-rank {self.rank} must be in [0, --pd-world {self.world_size})")
        if self.timeout_s <= 0:
            raise ValueError("the transfer timeout must be positive")

    @classmethod
    def parse(cls, master: str, rank: int, world_size: int, timeout_s: float = 10.0):
        host, _, port = master.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--pd-master must be HOST:PORT, got {master!r}")
        return cls(host, int(port), rank, world_size, timeout_s)


@dataclass
class Arrival:
    """A transfer a decode instance received (or failed to)."""

    transfer_id: int
    src: int
    meta: dict = field(default_factory=dict)
    layers: list[torch.Tensor] = field(default_factory=list)  # [2, n, bs, Hkv, D] each
    error: str | None = None
    received_at: float = field(default_factory=time.monotonic)


@dataclass
class _Job:
    transfer_id: int
    dst: int
    meta: dict
    layers: list[torch.Tensor] | LayerStream
    done: Callable[[str | None, float], None]  # (error or None, seconds)


class KVTransport:
    """One rank of the transfer group. `connect` blocks until every rank has joined."""

    def __init__(self, endpoint: TransferEndpoint) -> None:
        self.endpoint = endpoint
        self.rank = endpoint.rank
        self.world_size = endpoint.world_size
        self._store_: dist.TCPStore | None = None
        self._data_: dist.ProcessGroupGloo | None = None
        self._threads: list[threading.Thread] = []
        self._senders: dict[int, queue.Queue] = {}
        self._arrivals: dict[int, Arrival] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.dead_peers: set[int] = set()
        self.bytes_sent = 0

    def connect(self) -> None:
        ep = self.endpoint
        store = dist.TCPStore(
            ep.host, ep.port, ep.world_size, is_master=ep.rank == 0,
            timeout=_MEET, wait_for_workers=False,
        )  # fmt: skip
        self._store_ = store
        # instances load their models at different speeds: meeting may take a while; each
        # transfer's messages are bounded by the data timeout given to every wait
        self._data_ = dist.ProcessGroupGloo(
            dist.PrefixStore("moska/pd/data", store), ep.rank, ep.world_size, _MEET
        )

    @property
    def _store(self) -> dist.TCPStore:
        """The header store; only after `connect` (the sender and receiver threads start
        after it)."""
        assert self._store_ is not None, "KVTransport.connect() has not run"
        return self._store_

    @property
    def _data(self) -> dist.ProcessGroupGloo:
        """The point-to-point data group; only after `connect`."""
        assert self._data_ is not None, "KVTransport.connect() has not run"
        return self._data_

    # ---- prefill side ----------------------------------------------------------------
    def send(
        self,
        transfer_id: int,
        dst: int,
        meta: dict,
        layers: list[torch.Tensor] | LayerStream,
        done: Callable[[str | None, float], None],
    ) -> None:
        """Queue a transfer to rank `dst`; `done(error, seconds)` is called from the sender
        thread when it ends (error None: delivered). `layers` may be a `LayerStream` still
        being filled by a prefill step: each layer goes out as soon as it is there."""
        if not 0 <= dst < self.world_size or dst == self.rank:
            done(f"no decode rank {dst} in a transfer group of {self.world_size}", 0.0)
            return
        q = self._senders.get(dst)
        if q is None:
            q = self._senders[dst] = queue.Queue()
            t = threading.Thread(
                target=self._send_loop, args=(dst, q), name=f"moska-pd-send{dst}", daemon=True
            )
            t.start()
            self._threads.append(t)
        q.put(_Job(transfer_id, dst, meta, layers, done))

    def _send_loop(self, dst: int, q: queue.Queue) -> None:
        seq = 0
        while not self._closed:
            job = q.get()
            if job is None:
                return
            t0 = time.monotonic()
            error = None
            for attempt in range(2):  # a failed send is retried once
                if dst in self.dead_peers:
                    error = f"decode rank {dst} is gone"
                    break
                seq += 1
                try:
                    self._send_one(job, seq)
                    error = None
                    break
                except _PrefillFailed as exc:  # not the link: nothing to retry
                    error = f"the transfer's prefill failed: {exc}"
                    break
                except Exception as exc:  # noqa: BLE001 - a dead or stuck peer
                    error = f"sending to decode rank {dst} failed: {exc}"
                    logger.warning("transfer %d attempt %d: %s", job.transfer_id, attempt, error)
                    if _peer_closed(exc):
                        self.dead_peers.add(dst)
            job.done(error, time.monotonic() - t0)

    def _send_one(self, job: _Job, seq: int) -> None:
        meta = dict(job.meta)
        meta["transfer_id"] = job.transfer_id
        meta["num_layers"] = len(job.layers)
        layers = job.layers
        if isinstance(layers, LayerStream):  # filled while the prefill computes
            meta["layer_shape"], meta["dtype"] = list(layers.shape), str(layers.dtype)
        else:
            meta["layer_shape"] = list(layers[0].shape) if layers else []
            meta["dtype"] = str(layers[0].dtype) if layers else "torch.float32"
        self._store.set(f"moska/pd/hdr/{self.rank}->{job.dst}/{seq}", json.dumps(meta))
        timeout = timedelta(seconds=self.endpoint.timeout_s)
        failed: str | None = None
        for i in range(len(layers)):  # layer by layer: the receiver takes each as it comes
            if isinstance(layers, LayerStream) and failed is None:
                try:
                    layer = layers.layer(i, self.endpoint.timeout_s)
                except TimeoutError as exc:
                    # the prefill step failed after the header went out: mark the transfer
                    # aborted and fill its remaining layers with zeros, so that the receiver
                    # ends it at once (never injecting it) and the pair stays in step
                    failed = str(exc)
                    self._store.set(f"moska/pd/abort/{self.rank}->{job.dst}/{seq}", failed)
            if failed is not None:
                assert isinstance(layers, LayerStream)
                layer = torch.zeros(layers.shape, dtype=layers.dtype)
            elif not isinstance(layers, LayerStream):
                layer = layers[i]
            t = layer.contiguous().cpu()
            # torch's stubs leave send/recv off Backend; ProcessGroupGloo binds them
            self._data.send([t], job.dst, seq).wait(timeout)  # type: ignore[attr-defined]
            self.bytes_sent += t.numel() * t.element_size()
        if failed is not None:
            raise _PrefillFailed(failed)

    # ---- decode side -----------------------------------------------------------------
    def start_receiving(self, sources: list[int]) -> None:
        for src in sources:
            t = threading.Thread(
                target=self._recv_loop, args=(src,), name=f"moska-pd-recv{src}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def _recv_loop(self, src: int) -> None:
        timeout = timedelta(seconds=self.endpoint.timeout_s)
        seq, idle = 0, 0.0
        while not self._closed:
            key = f"moska/pd/hdr/{src}->{self.rank}/{seq + 1}"
            try:
                if not self._store.check([key]):
                    idle = min(_POLL_MAX_S, idle * 2 or 0.001)
                    time.sleep(idle)  # (the store's own wait logs every timeout)
                    continue
            except Exception as exc:  # noqa: BLE001 - rank 0, the store's host, is gone
                if not self._closed:
                    logger.warning("the transfer store stopped answering: %s", exc)
                return
            idle = 0.0
            seq += 1
            meta = json.loads(self._store.get(key).decode())
            self._store.delete_key(key)
            arrival = Arrival(int(meta["transfer_id"]), src, meta)
            try:
                shape, dtype = meta["layer_shape"], _DTYPES[meta["dtype"]]
                for _ in range(int(meta["num_layers"])):
                    t = torch.empty(shape, dtype=dtype)
                    self._data.recv([t], src, seq).wait(timeout)  # type: ignore[attr-defined]
                    arrival.layers.append(t)
                abort = f"moska/pd/abort/{src}->{self.rank}/{seq}"
                if self._store.check([abort]):  # the sender's prefill failed midway
                    arrival.error = f"transfer {arrival.transfer_id} was aborted: " + (
                        self._store.get(abort).decode()
                    )
                    self._store.delete_key(abort)
                    arrival.layers.clear()
            except Exception as exc:  # noqa: BLE001 - recorded for the waiting request
                arrival.error = f"receiving transfer {arrival.transfer_id} from rank {src} " + (
                    f"failed: {exc}"
                )
                logger.warning(arrival.error)
            self._deliver(arrival)

    def _deliver(self, arrival: Arrival) -> None:
        with self._cond:
            now = time.monotonic()
            for tid in [t for t, a in self._arrivals.items() if now - a.received_at > 120]:
                del self._arrivals[tid]  # never claimed (its request went elsewhere)
            self._arrivals[arrival.transfer_id] = arrival
            self._cond.notify_all()

    def wait_arrival(self, transfer_id: int, timeout_s: float) -> Arrival:
        """The transfer `transfer_id`, waiting up to `timeout_s`; raises TransferFailedError
        on a timeout or a failed receive."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while transfer_id not in self._arrivals:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise TransferFailedError(
                        f"transfer {transfer_id} did not arrive within {timeout_s:.1f} s"
                    )
                self._cond.wait(left)
            arrival = self._arrivals.pop(transfer_id)
        if arrival.error is not None:
            raise TransferFailedError(arrival.error)
        return arrival

    def close(self) -> None:
        """Stop the threads (each within its poll or data timeout) and wait for them."""
        self._closed = True
        for q in self._senders.values():
            q.put(None)
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(self.endpoint.timeout_s + 1.0)


class _PrefillFailed(Exception):
    """A streamed transfer's prefill step failed (its layers never came)."""


def _peer_closed(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("closed", "reset", "broken pipe", "connection refused"))
