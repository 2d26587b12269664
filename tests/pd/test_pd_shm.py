"""The same-host KV channel (`pd/ring.py`): two transfer ranks on one host pick the
shared-memory ring by themselves and move KV byte-exact through it (chunked layers, bf16, a
streamed transfer); a forced kind that cannot work fails the transfer with what to do; a
peer that vanishes (stops, or closes) ends the other side's wait within the deadline."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from conftest import transport_pair

from moska.pd.errors import TransferFailedError
from moska.pd.ring import ChannelError, Ring, RingSpec
from moska.pd.stream import LayerStream
from moska.pd.transport import KVTransport

pytestmark = pytest.mark.timeout(60)
TIMEOUT_S = 1.5
NEVER_S = 0.3  # the timeout of a read whose data never comes: all of it is waited


def _pair(transport: str = "auto") -> list[KVTransport]:
    return transport_pair(TIMEOUT_S, transport)


class _Done:
    def __init__(self) -> None:
        self.results: dict[int, str | None] = {}
        self.cond = threading.Condition()

    def __call__(self, tid: int):
        def cb(error, _s) -> None:
            with self.cond:
                self.results[tid] = error
                self.cond.notify_all()

        return cb

    def wait(self, tid: int, timeout_s: float) -> str | None:
        with self.cond:
            assert self.cond.wait_for(lambda: tid in self.results, timeout_s), tid
            return self.results[tid]


@pytest.fixture(scope="module")
def pair():
    ranks = _pair()
    yield ranks
    for r in ranks:
        r.close()


def test_shm_is_chosen_and_exact(pair):
    sender, receiver = pair
    done = _Done()
    # 5 MiB fp32 layers: two 4 MiB chunks each; then bf16 layers; then a streamed transfer
    layers = [torch.randn(2, 80, 16, 8, 64) for _ in range(3)]
    sender.send(1, 1, {"tokens": [1, 2]}, layers, done(1))
    got = receiver.wait_arrival(1, 10.0)
    assert done.wait(1, 10.0) is None
    assert sender.channels == {1: "shm"} and got.meta["channel"] == "shm"
    assert got.meta["tokens"] == [1, 2]
    assert all(torch.equal(a, b) for a, b in zip(got.layers, layers, strict=True))
    halves = [torch.randn(2, 3, 16, 2, 8).to(torch.bfloat16) for _ in range(4)]
    sender.send(2, 1, {}, halves, done(2))
    got = receiver.wait_arrival(2, 10.0)
    assert all(torch.equal(a, b) for a, b in zip(got.layers, halves, strict=True))
    stream = LayerStream(4, (2, 5, 16, 2, 8), torch.float32)
    sender.send(3, 1, {}, stream, done(3))
    fresh = [torch.randn(stream.shape) for _ in range(4)]
    for i, t in enumerate(fresh):
        stream.put(i, t)
    got = receiver.wait_arrival(3, 10.0)
    assert all(torch.equal(a, b) for a, b in zip(got.layers, fresh, strict=True))
    ring = sender._rings_out[1]
    assert ring is not None and not os.path.exists(ring.spec.path)  # nothing left in /dev/shm


def test_auto_falls_back_to_gloo_when_the_ring_cannot_be_mapped(monkeypatch):
    """Another host (its /dev/shm is not ours): the receiver refuses the ring, auto sends
    over gloo, exact; a forced shm fails with what to do."""
    from moska.pd import ring as rings

    def elsewhere(spec):
        raise ChannelError(f"cannot open the ring {spec.path} here: no such file")

    monkeypatch.setattr(
        rings.Ring, "attach", classmethod(lambda cls, spec, device=None: elsewhere(spec))
    )
    for mode in ("auto", "shm"):
        sender, receiver = _pair(mode)
        try:
            done = _Done()
            layers = [torch.randn(2, 3, 16, 2, 8) for _ in range(2)]
            sender.send(1, 1, {}, layers, done(1))
            error = done.wait(1, 10.0)
            if mode == "shm":
                assert error is not None and "cannot open the ring" in error
                assert "use --pd-transport auto or gloo" in error
                continue
            got = receiver.wait_arrival(1, 10.0)
            assert error is None and sender.channels == {1: "gloo"}
            assert got.meta["channel"] == "gloo"
            assert all(torch.equal(a, b) for a, b in zip(got.layers, layers, strict=True))
        finally:
            for r in (sender, receiver):
                r.close()


def test_forced_cuda_ipc_without_cuda_fails_with_advice():
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the kind can work here")
    sender, receiver = _pair("cuda_ipc")
    try:
        done = _Done()
        sender.send(1, 1, {}, [torch.randn(2, 1, 16, 2, 8)], done(1))
        error = done.wait(1, 10.0)
        assert error is not None and "use --pd-transport auto or gloo" in error
    finally:
        for r in (sender, receiver):
            r.close()


def test_a_vanished_receiver_fails_the_send_within_the_deadline():
    sender, receiver = _pair("shm")
    try:
        done = _Done()
        sender.send(1, 1, {}, [torch.randn(2, 1, 16, 2, 8)], done(1))
        assert done.wait(1, 10.0) is None and sender.channels[1] == "shm"
        receiver._closed = True  # its threads stop without a word: as if killed
        t0 = time.monotonic()
        sender.send(2, 1, {}, [torch.randn(2, 1, 16, 2, 8)], done(2))
        error = done.wait(2, 4 * TIMEOUT_S + 5)
        assert error is not None and "timed out" in error
        assert time.monotonic() - t0 < 2 * TIMEOUT_S + 2  # two attempts, each bounded
        with pytest.raises(TransferFailedError):
            receiver.wait_arrival(2, 0.1)
    finally:
        for r in (sender, receiver):
            r.close()


def test_a_vanished_writer_ends_the_read_within_the_deadline():
    writer = Ring.create("shm")
    reader = Ring.attach(RingSpec.from_json(writer.spec.to_json()))
    writer.unlink()
    layer = torch.randn(2, 4, 16, 2, 8)
    writer.write(layer, 1, 0, TIMEOUT_S)
    out = torch.empty_like(layer)
    reader.read_into(out, 1, 0, TIMEOUT_S)
    assert torch.equal(out, layer)
    t0 = time.monotonic()
    with pytest.raises(ChannelError, match="timed out"):  # layer 1 never comes
        reader.read_into(out, 1, 1, NEVER_S)
    assert NEVER_S <= time.monotonic() - t0 < NEVER_S + 1
    writer.close()  # a writer that says it is gone: the wait ends at once
    t0 = time.monotonic()
    with pytest.raises(ChannelError, match="closed"):
        reader.read_into(out, 1, 1, 30.0)
    assert time.monotonic() - t0 < 1.0
    # a stale chunk of a transfer the writer gave up is dropped, the next one read
    reader2 = Ring.create("shm")
    peer = Ring.attach(RingSpec.from_json(reader2.spec.to_json()))
    reader2.unlink()
    reader2.write(torch.randn(2, 4, 16, 2, 8), 5, 0, TIMEOUT_S)  # seq 5, abandoned
    reader2.write(layer, 6, 0, TIMEOUT_S)
    peer.read_into(out, 6, 0, TIMEOUT_S)
    assert torch.equal(out, layer)


def test_a_send_failing_midway_is_retried_and_delivered(pair):
    """The sender's retry (a new SEQ) delivers although the receiver saw the first attempt
    fail midway and was already waiting: that attempt's error is not the transfer's."""
    sender, receiver = pair
    done = _Done()
    sender.send(1, 1, {}, [torch.randn(2, 1, 16, 2, 8)], done(1))  # the ring is set up
    assert done.wait(1, 10.0) is None and sender.channels[1] == "shm"
    ring = sender._rings_out[1]
    write, calls = ring.write, []

    def flaky(t, seq, layer, timeout_s):
        calls.append((seq, layer))
        if len(calls) == 2:  # the first attempt's second layer: after its header and layer 0
            raise ChannelError("a flaky link")
        if len(calls) == 3:  # the retry: the receiver has failed the first attempt by then
            time.sleep(0.2)
        write(t, seq, layer, timeout_s)

    ring.write = flaky
    got: dict = {}
    waiter = threading.Thread(target=lambda: got.update(a=_arrival(receiver, 2)))
    waiter.start()  # waiting before the transfer starts, as a decode instance's accept is
    layers = [torch.randn(2, 3, 16, 2, 8) for _ in range(3)]
    sender.send(2, 1, {}, layers, done(2))
    assert done.wait(2, 10.0) is None  # delivered by the retry
    waiter.join(15)
    assert len({seq for seq, _ in calls}) == 2  # two attempts
    arrival = got["a"]
    assert not isinstance(arrival, Exception), arrival
    assert all(torch.equal(a, b) for a, b in zip(arrival.layers, layers, strict=True))


def _arrival(receiver, tid):
    try:
        return receiver.wait_arrival(tid, 10.0)
    except TransferFailedError as exc:
        return exc
