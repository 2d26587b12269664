"""A same-host KV channel between one prefill (writer) and one decode rank (reader): a ring
of slots whose counters live in a small shared-memory file, and whose data lives either in
that file too (`shm`) or in a GPU buffer the writer exports as a CUDA IPC handle
(`cuda_ipc`: the reader maps the writer's device memory, and each chunk is one
device-to-device copy; with the instances on two GPUs (`gpu_placement.py`) the reader maps
the peer GPU's buffer, CUDA IPC enabling peer access, and the copy goes peer to peer). No sockets: gloo moved 0.37 GB/s between two processes on one
H200 (bench/results/pd_transfer_h200.json), a memory copy is 50x that.

A layer's KV is cut into chunks of at most `slot_bytes`; chunk k of layer i of the pair's
transfer SEQ goes into the next free slot, stamped (SEQ, i, k), and the `written` counter
moves on; the reader copies it out and moves `read` on. Every wait is bounded by the
caller's deadline and ends at once when the other side marked the ring closed, so a
vanished peer is an error, never a hang. A reader that finds chunks of an older SEQ (a
transfer the writer gave up and retried) drops them; chunks of a newer SEQ end the
transfer it was reading (the writer moved on) without being consumed.

The writer creates the ring and offers its `RingSpec` through the transfer store; the file
is unlinked as soon as the reader mapped it (or refused it: another host or another
/dev/shm), so nothing is left in /dev/shm after a crash. The spec's IPC handle is a pickle:
the store is the cluster's own (gloo trusts it in the same way).
"""

from __future__ import annotations

import base64
import contextlib
import json
import mmap
import os
import pickle
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

KINDS = ("shm", "cuda_ipc")
_MAGIC = 0x6D6F736B61524E47  # "moskaRNG"
_MAGIC_W, _NONCE_W, _WRITTEN_W, _READ_W, _WCLOSED_W, _RCLOSED_W = range(6)
_HDR_WORDS = 8  # then (seq, layer, chunk) per slot
_PAUSE_MAX_S = 0.0005  # longest sleep of a waiting side (the latency it may add per chunk)
# slots x bytes: host rings take tmpfs memory (reserved up front, never a SIGBUS later)
# (8 x 8 MiB moved the most on a 2-core host, against 4 and 16 MiB slots)
SIZES = {"shm": (8, 8 << 20), "cuda_ipc": (4, 64 << 20)}


class ChannelError(RuntimeError):
    """The ring could not be made, mapped or used (the peer closed it, or a deadline)."""


@dataclass(frozen=True)
class RingSpec:
    """What the reader needs to map a ring (sent as JSON through the transfer store)."""

    kind: str
    path: str  # the control file (and, for shm, the data)
    slots: int
    slot_bytes: int
    nonce: int
    ipc: str = ""  # cuda_ipc: base64 pickle of torch's (rebuild, args) for the data buffer

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RingSpec:
        return cls(**json.loads(text))


def _ctl_bytes(slots: int) -> int:
    return -(-8 * (_HDR_WORDS + 3 * slots) // mmap.PAGESIZE) * mmap.PAGESIZE


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class Ring:
    """One side of a ring (`create` for the writer, `attach` for the reader)."""

    def __init__(self, spec: RingSpec, mm: mmap.mmap, data: torch.Tensor, writer: bool):
        self.spec, self.writer = spec, writer
        self._mm = mm
        self._ctl = np.frombuffer(mm, dtype=np.int64, count=_HDR_WORDS + 3 * spec.slots)
        self._meta = self._ctl[_HDR_WORDS:].reshape(spec.slots, 3)
        self.data = data  # [slots, slot_bytes] uint8, on the host or a GPU
        self.device = data.device
        self._cuda = torch.cuda.Stream(data.device) if data.is_cuda else None
        self._unlinked = not writer

    # ---- making and mapping ---------------------------------------------------------
    @classmethod
    def create(cls, kind: str, device: torch.device | None = None) -> Ring:
        if kind not in KINDS:
            raise ChannelError(f"no ring kind {kind!r} (one of {', '.join(KINDS)})")
        slots, slot_bytes = SIZES[kind]
        path = os.path.join(_shm_dir(), f"moska-pd-{os.getpid()}-{secrets.token_hex(6)}")
        size = _ctl_bytes(slots) + (slots * slot_bytes if kind == "shm" else 0)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # ENOSPC now rather than a SIGBUS mid-copy
            mm = mmap.mmap(fd, size)
        except OSError as exc:
            os.unlink(path)
            raise ChannelError(f"no room for a {size >> 20} MiB ring in {path}: {exc}") from exc
        finally:
            os.close(fd)
        nonce = secrets.randbits(62)
        ipc = ""
        if kind == "shm":
            data = _host_view(mm, slots, slot_bytes)
        else:
            if device is None or device.type != "cuda":
                mm.close()
                os.unlink(path)
                raise ChannelError("a cuda_ipc ring needs the KV on a CUDA device")
            from torch.multiprocessing.reductions import reduce_tensor

            data = torch.empty((slots, slot_bytes), dtype=torch.uint8, device=device)
            ipc = base64.b64encode(pickle.dumps(reduce_tensor(data))).decode()
        ring = cls(RingSpec(kind, path, slots, slot_bytes, nonce, ipc), mm, data, writer=True)
        ring._ctl[_NONCE_W] = nonce
        ring._ctl[_MAGIC_W] = _MAGIC
        return ring

    @classmethod
    def attach(cls, spec: RingSpec, device: torch.device | None = None) -> Ring:
        """Map a ring another rank offered; ChannelError when it is not on this host (or
        not this /dev/shm, or, for cuda_ipc, not openable from this process). `device`
        (cuda_ipc): open the buffer from this process's own GPU (CUDA IPC maps a peer GPU's
        memory with peer access) instead of the writer's device index, which in this
        process may be another GPU (`--device cuda:1` beside a prefill on cuda:0 would
        otherwise start a context on cuda:0 and receive there)."""
        try:
            fd = os.open(spec.path, os.O_RDWR)
        except OSError as exc:
            raise ChannelError(f"cannot open the ring {spec.path} here: {exc}") from exc
        try:
            mm = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        ctl = np.frombuffer(mm, dtype=np.int64, count=2)
        if int(ctl[_MAGIC_W]) != _MAGIC or int(ctl[_NONCE_W]) != spec.nonce:
            del ctl
            mm.close()
            raise ChannelError(f"{spec.path} here is not the ring offered (another host)")
        del ctl
        if spec.kind == "shm":
            data = _host_view(mm, spec.slots, spec.slot_bytes)
        else:
            try:
                rebuild, args = pickle.loads(base64.b64decode(spec.ipc))
                if device is not None and device.type == "cuda":
                    index = device.index if device.index is not None else 0
                    args = (*args[:6], index, *args[7:])  # rebuild_cuda_tensor's storage_device
                data = rebuild(*args)
            except Exception as exc:
                mm.close()
                raise ChannelError(f"cannot open the CUDA IPC buffer: {exc}") from exc
        return cls(spec, mm, data, writer=False)

    def unlink(self) -> None:
        """Remove the file (both sides keep their mappings)."""
        if not self._unlinked:
            self._unlinked = True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spec.path)

    def close(self) -> None:
        """Mark this side closed (the peer's waits end at once) and drop the file."""
        self._ctl[_WCLOSED_W if self.writer else _RCLOSED_W] = 1
        self.unlink()

    # ---- moving bytes ---------------------------------------------------------------
    def _chunks(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.spec.slot_bytes))

    def write(self, t: torch.Tensor, seq: int, layer: int, timeout_s: float) -> None:
        """Put tensor `t` in the ring as layer `layer` of transfer `seq`. `t` is on the
        host or a GPU tensor whose producer has finished (a synchronized event): the copy
        runs on the ring's own stream, which waits for no other."""
        src = t.contiguous().reshape(-1).view(torch.uint8)
        ctl, n_slots, size = self._ctl, self.spec.slots, self.spec.slot_bytes
        if ctl[_RCLOSED_W]:
            raise ChannelError("the decode (reader) side closed the ring")
        for k in range(self._chunks(src.numel())):
            self._wait(lambda: ctl[_WRITTEN_W] - ctl[_READ_W] < n_slots, "a free slot", timeout_s)
            w = int(ctl[_WRITTEN_W])
            piece = src[k * size : (k + 1) * size]
            self._copy(self.data[w % n_slots, : piece.numel()], piece)
            self._meta[w % n_slots] = (seq, layer, k)
            ctl[_WRITTEN_W] = w + 1  # after the bytes (x86 keeps stores in order)

    def read_into(self, out: torch.Tensor, seq: int, layer: int, timeout_s: float) -> None:
        """Fill contiguous `out` with layer `layer` of transfer `seq`."""
        dst = out.view(-1).view(torch.uint8)
        ctl, n_slots, size = self._ctl, self.spec.slots, self.spec.slot_bytes
        for k in range(self._chunks(dst.numel())):
            while True:
                self._wait(lambda: ctl[_WRITTEN_W] > ctl[_READ_W], f"layer {layer}", timeout_s)
                r = int(ctl[_READ_W])
                got = tuple(int(x) for x in self._meta[r % n_slots])
                if got[0] < seq:  # left over from a transfer the writer gave up
                    ctl[_READ_W] = r + 1
                    continue
                if got != (seq, layer, k):
                    raise ChannelError(
                        f"the ring is out of step: got {got}, expected {(seq, layer, k)}"
                    )
                break
            piece = dst[k * size : (k + 1) * size]
            self._copy(piece, self.data[r % n_slots, : piece.numel()])
            ctl[_READ_W] = r + 1

    def drained(self, timeout_s: float) -> None:
        """Wait until the reader took everything written (the transfer was delivered)."""
        ctl = self._ctl
        self._wait(lambda: ctl[_READ_W] >= ctl[_WRITTEN_W], "the reader to take it", timeout_s)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self._cuda is None:
            dst.copy_(src)
            return
        with torch.cuda.stream(self._cuda):
            dst.copy_(src, non_blocking=True)
        self._cuda.synchronize()  # the peer may read the slot as soon as the counter moves

    def _wait(self, ready, what: str, timeout_s: float) -> None:
        if ready():
            return
        deadline = time.monotonic() + timeout_s
        peer_closed = _RCLOSED_W if self.writer else _WCLOSED_W
        pause = 0.0
        while not ready():
            if self._ctl[peer_closed]:
                side = "decode (reader)" if self.writer else "prefill (writer)"
                raise ChannelError(f"the {side} side closed the ring while waiting for {what}")
            if time.monotonic() > deadline:
                raise ChannelError(f"timed out after {timeout_s:.1f} s waiting for {what}")
            time.sleep(pause)
            pause = min(_PAUSE_MAX_S, pause * 2 or 2e-5)


def _host_view(mm: mmap.mmap, slots: int, slot_bytes: int) -> torch.Tensor:
    off = _ctl_bytes(slots)
    flat = torch.frombuffer(mm, dtype=torch.uint8, count=slots * slot_bytes, offset=off)
    return flat.view(slots, slot_bytes)


def kinds_to_try(mode: str, on_cuda: bool) -> list[str]:
    """The ring kinds a sender offers, best first, for `--pd-transport mode` (empty: gloo)."""
    if mode == "auto":
        return (["cuda_ipc"] if on_cuda else []) + ["shm"]
    return [mode] if mode in KINDS else []


def offer(
    store, src: int, dst: int, seqs: Iterator[int], kinds: list[str],
    device: torch.device, timeout_s: float, closed: Callable[[], bool],
) -> tuple[Ring | None, str]:  # fmt: skip
    """Offer rings of `kinds` in turn to rank `dst` (a header of type "ring" under the
    pair's next SEQ, answered under `moska/pd/ack/SRC->DST/SEQ`) until one is taken:
    (the ring, "") or (None, why none was). ChannelError when `dst` does not answer within
    `timeout_s` (the sender decides at its next transfer)."""
    refused = "no ring was offered"
    for kind in kinds:
        try:
            ring = Ring.create(kind, device)
        except ChannelError as exc:
            refused = str(exc)
            continue
        seq = next(seqs)
        header = {"type": "ring", "ring": ring.spec.to_json()}
        store.set(f"moska/pd/hdr/{src}->{dst}/{seq}", json.dumps(header))
        answer = _wait_key(store, f"moska/pd/ack/{src}->{dst}/{seq}", timeout_s, closed)
        ring.unlink()  # mapped by the receiver (or never to be)
        if answer == "ok":
            return ring, ""
        ring.close()
        if answer is None:
            raise ChannelError(f"decode rank {dst} did not answer the {kind} offer")
        refused = answer
    return None, refused


def accept(
    store, src: int, dst: int, seq: int, spec: str, device: torch.device | None = None
) -> Ring | None:
    """The receiver's side of `offer`: map the ring (from `device`, `Ring.attach`) and
    answer "ok", or answer why not."""
    ring = None
    try:
        ring = Ring.attach(RingSpec.from_json(spec), device)
        answer = "ok"
    except Exception as exc:  # noqa: BLE001 - the answer tells the sender to fall back
        answer = f"decode rank {dst} cannot map it: {exc}"
    store.set(f"moska/pd/ack/{src}->{dst}/{seq}", answer)
    return ring


def _wait_key(store, key: str, timeout_s: float, closed: Callable[[], bool]) -> str | None:
    """The value set under `key` within `timeout_s` (then deleted), or None."""
    deadline = time.monotonic() + timeout_s
    pause = 0.0
    while not store.check([key]):
        if time.monotonic() > deadline or closed():
            return None
        time.sleep(pause)
        pause = min(0.02, pause * 2 or 0.0005)
    value = store.get(key).decode()
    store.delete_key(key)
    return value
