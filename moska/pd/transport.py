"""KV transfer between prefill and decode instances: headers through a torch.distributed
store, KV over gloo across hosts and through shared memory (or CUDA IPC) on one host.

Every instance of a prefill/decode cluster is one rank of a transfer group (P + D ranks;
rank 0 hosts the TCPStore the others meet on; its address and flags are an
`endpoint.TransferEndpoint`). The group is a `ProcessGroupGloo` built directly (no global
default group, so several ranks may live in one process, as in the tests). A transfer is:

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
request.

Same-host fast path (`--pd-transport auto|gloo|shm|cuda_ipc`, `ring.py`): gloo moved
0.37 GB/s between two processes on one H200. Before its first transfer to a decode rank,
the sender offers a ring (a header of type "ring": CUDA IPC when its KV is on a GPU, then
shared memory) and waits for the receiver's answer under `moska/pd/ack/SRC->DST/SEQ`;
the receiver maps it or says why not (another host). `auto` takes the first ring accepted
and gloo when none is (cross-host); a named kind that is refused fails the transfer. Each
transfer's header says its channel; a ring transfer is delivered when the receiver took
its last chunk. NCCL refuses two ranks on one GPU, hence CUDA IPC there.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from moska.pd import ring as rings
from moska.pd.endpoint import TransferEndpoint
from moska.pd.errors import TransferFailedError
from moska.pd.ring import ChannelError, Ring
from moska.pd.stream import LayerStream

logger = logging.getLogger(__name__)

_MEET = timedelta(seconds=300)  # how long ranks wait for each other at startup
_POLL_MAX_S = 0.02  # a receiver checks the store for the next header at least this often
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


@dataclass
class Arrival:
    """A transfer a decode instance received (or failed to)."""

    transfer_id: int
    src: int
    meta: dict = field(default_factory=dict)
    layers: list[torch.Tensor] = field(default_factory=list)  # [2, n, bs, Hkv, D] each
    error: str | None = None
    received_at: float = field(default_factory=time.monotonic)
    retry_may_follow: bool = False  # a receive failed here (not an abort): the sender retries


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
        self._rings_out: dict[int, Ring | None] = {}  # dst -> its ring (None: gloo)
        self._rings_in: dict[int, Ring] = {}  # src -> the ring it offered
        self.channels: dict[int, str] = {}  # dst -> "gloo" | "shm" | "cuda_ipc", once known
        # the decode rank's KV device: a CUDA IPC ring is opened from it and its layers
        # received there, each chunk copied peer to peer when the writer is on another GPU
        # (None: the writer's device index, which is this process's own GPU when the
        # instances were placed by `gpu_placement`)
        self.recv_device: torch.device | None = None

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
        if isinstance(layers, LayerStream) and self.channels.get(dst) == "cuda_ipc":
            layers.want_host = False  # device to device: no staging through the host
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
        seqs = iter(range(1, 1 << 62))  # this pair's header numbers, in order
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
                try:
                    if dst not in self._rings_out:
                        self._choose_channel(job, seqs)
                    self._send_one(job, next(seqs))
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

    def _choose_channel(self, job: _Job, seqs: Iterator[int]) -> None:
        """Offer rings to `job.dst` until one is accepted (module doc), each under the next
        of the pair's `seqs`. A receiver that does not answer leaves the choice to the next
        transfer."""
        mode, dst = self.endpoint.transport, job.dst
        layers = job.layers
        device = layers.device if isinstance(layers, LayerStream) else (
            layers[0].device if layers else torch.device("cpu"))  # fmt: skip
        kinds = rings.kinds_to_try(mode, device.type == "cuda")
        ring, refused = rings.offer(
            self._store, self.rank, dst, seqs, kinds, device, self.endpoint.timeout_s,
            lambda: self._closed,
        )  # fmt: skip
        if ring is None and mode != "auto" and mode != "gloo":
            raise ChannelError(f"--pd-transport {mode} to decode rank {dst}: {refused} "
                               "(use --pd-transport auto or gloo)")  # fmt: skip
        self._rings_out[dst] = ring
        self.channels[dst] = ring.spec.kind if ring is not None else "gloo"

    def _send_one(self, job: _Job, seq: int) -> None:
        ring = self._rings_out.get(job.dst)
        meta = dict(job.meta)
        meta["channel"] = ring.spec.kind if ring is not None else "gloo"
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
            if ring is not None:
                ring.write(layer, seq, i, self.endpoint.timeout_s)
            else:
                layer = layer.contiguous().cpu()
                # torch's stubs leave send/recv off Backend; ProcessGroupGloo binds them
                self._data.send([layer], job.dst, seq).wait(timeout)  # type: ignore[attr-defined]
            self.bytes_sent += layer.numel() * layer.element_size()
        if ring is not None:
            ring.drained(self.endpoint.timeout_s)  # delivered: the receiver took it all
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
            if meta.get("type") == "ring":
                self._take_ring(src, seq, meta["ring"])
                continue
            arrival = Arrival(int(meta["transfer_id"]), src, meta)
            try:
                shape, dtype = meta["layer_shape"], _DTYPES[meta["dtype"]]
                ring = None
                if meta.get("channel", "gloo") != "gloo":
                    ring = self._rings_in.get(src)
                    if ring is None or ring.spec.kind != meta["channel"]:
                        raise ChannelError(f"no {meta['channel']} ring from rank {src}")
                for i in range(int(meta["num_layers"])):
                    if ring is not None:
                        dev = self.recv_device if ring.data.is_cuda else None
                        t = torch.empty(shape, dtype=dtype, device=dev or ring.device)
                        ring.read_into(t, seq, i, self.endpoint.timeout_s)
                    else:
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
                arrival.retry_may_follow = True
                logger.warning(arrival.error)
            self._deliver(arrival)

    def _take_ring(self, src: int, seq: int, spec: str) -> None:
        ring = rings.accept(self._store, src, self.rank, seq, spec, self.recv_device)
        if ring is not None:
            old = self._rings_in.get(src)
            if old is not None:
                old.close()
            self._rings_in[src] = ring

    def _deliver(self, arrival: Arrival) -> None:
        with self._cond:
            now = time.monotonic()
            for tid in [t for t, a in self._arrivals.items() if now - a.received_at > 120]:
                del self._arrivals[tid]  # never claimed (its request went elsewhere)
            self._arrivals[arrival.transfer_id] = arrival
            self._cond.notify_all()

    def wait_arrival(self, transfer_id: int, timeout_s: float) -> Arrival:
        """The transfer `transfer_id` within `timeout_s`, else TransferFailedError. A receive
        failed here is not the end while time is left: the sender retries once, same id (a
        lasting failure reaches the front end from the sender, `GET /pd/transfer`)."""
        deadline = time.monotonic() + timeout_s
        error = None
        with self._cond:
            while True:
                while transfer_id not in self._arrivals:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._closed:
                        late = f"transfer {transfer_id} did not arrive within {timeout_s:.1f} s"
                        raise TransferFailedError(error or late)
                    self._cond.wait(left)
                arrival = self._arrivals.pop(transfer_id)
                if arrival.error is None or not arrival.retry_may_follow:
                    break
                error = arrival.error  # the retry may still come
        if arrival.error is not None:
            raise TransferFailedError(arrival.error)
        return arrival

    def close(self) -> None:
        """Stop the threads (each within its poll or data timeout) and wait for them."""
        self._closed = True
        for ring in [*self._rings_out.values(), *self._rings_in.values()]:
            if ring is not None:
                ring.close()  # the peer's waits on it end at once
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
