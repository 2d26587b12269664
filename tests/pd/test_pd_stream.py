"""Layer-by-layer KV capture (`pd/stream.py`): what a prefill step streams, layer by layer,
equals the finished request's KV read out afterwards (`kv_blocks.snapshot`, the sequential
path), for a prompt computed in one step, one found partly in the prefix cache and one
prefilled in chunks; and each layer is in the stream before the next layer runs."""

from __future__ import annotations

import contextlib
import random
import threading

import pytest
import torch
from conftest import transport_pair  # at import: tests/pd's conftest (see test_pd_shm)

from moska.engine.sampling_params import SamplingParams
from moska.pd import kv_blocks
from moska.pd.stream import LayerCapture, stream_for

pytestmark = pytest.mark.timeout(60)


def _run(engine, rid, prompt):
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0))
    for _ in range(100):
        engine.step()
        if not engine.has_unfinished_requests():
            return
    raise AssertionError("the request did not finish")


def test_streamed_layers_equal_the_finished_snapshot():
    from tests.pd.conftest import make_engine

    engine = make_engine(max_num_batched_tokens=64)
    streams, snaps, order = {}, {}, []

    def on_step(scheduled):
        out = []
        for item in scheduled:
            req = item.request
            if req.num_computed_tokens + item.num_new_tokens == req.num_tokens:
                meta, stream = stream_for(engine, req)
                streams[req.request_id] = (meta, stream)
                out.append((req, stream))
        return out

    cap = LayerCapture.install(engine, on_step)
    num_slots = engine.runner.cache.k.shape[0]
    # each hook sees the layers before it already streamed, the later ones not yet
    for slot, layer in enumerate(engine.runner.model.decoder_layers):

        def pre(_m, _i, slot=slot):
            for _, s in streams.values():
                if not s.complete():
                    order.append((slot, [s._layers[j] is not None for j in range(num_slots)]))

        layer.self_attn.register_forward_pre_hook(pre)
    bm = engine.block_manager
    free = bm.free

    def free_and_snapshot(request):
        if getattr(request, "request_id", "").startswith("r"):
            snaps[request.request_id] = kv_blocks.snapshot(engine, request)
        free(request)

    bm.free = free_and_snapshot
    rng = random.Random(0)
    shared = [rng.randrange(10, 250) for _ in range(40)]
    prompts = {
        "r-one-step": [rng.randrange(10, 250) for _ in range(45)],
        "r-shared": shared + [rng.randrange(10, 250) for _ in range(9)],
        "r-cached": shared + [rng.randrange(10, 250) for _ in range(20)],  # 2 blocks cached
        "r-chunked": [rng.randrange(10, 250) for _ in range(150)],  # 3 steps of 64 tokens
    }
    for rid, prompt in prompts.items():
        _run(engine, rid, prompt)
    cap.remove()
    assert set(streams) == set(prompts)
    for rid, (meta, stream) in streams.items():
        snap_meta, layers = snaps[rid]
        assert stream.complete() and meta == snap_meta, rid  # the same header, before and after
        assert len(stream) == len(layers) == num_slots
        for i, ref in enumerate(layers):
            got = stream.layer(i, 1.0)
            assert got.shape == ref.shape and got.abs().sum() > 0
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert snaps["r-cached"][0]["cached_tokens"] == 32  # the cached blocks went out too
    for slot, seen in order:  # layer `slot` about to run: exactly the ones before it are in
        assert seen == [j < slot for j in range(num_slots)], (slot, seen)
    assert engine.runner.launch == cap._launch  # removed


def test_a_failed_step_fails_its_stream():
    from tests.pd.conftest import make_engine

    engine = make_engine()
    made = []

    def on_step(scheduled):
        _, stream = stream_for(engine, scheduled[0].request)
        made.append(stream)
        return [(scheduled[0].request, stream)]

    LayerCapture.install(engine, on_step)
    layer = engine.runner.model.decoder_layers[1].self_attn

    def boom(*_):
        raise RuntimeError("injected")

    handle = layer.register_forward_pre_hook(boom)
    engine.add_request("x", list(range(10, 60)), SamplingParams(max_tokens=1))
    with contextlib.suppress(Exception):  # the engine may re-raise the step's failure
        engine.step()
    handle.remove()
    stream = made[0]
    assert stream.layer(0, 1.0).shape[1] == 3  # layer 0 was computed and streamed
    with pytest.raises(TimeoutError, match="ended before"):
        stream.layer(1, 1.0)


def test_a_failed_stream_aborts_its_transfer_and_the_pair_stays_in_step():
    """A prefill step that fails after its header went out: the decode side ends the
    transfer as aborted (never a data timeout, never its zeros), and the next transfer of
    the pair arrives intact."""
    from moska.pd.errors import TransferFailedError
    from moska.pd.stream import LayerStream

    ranks = transport_pair(5.0)
    try:
        shape = (2, 3, 16, 2, 8)
        stream = LayerStream(4, shape, torch.float32)
        done: dict[int, str | None] = {}
        ended = threading.Condition()

        def on_done(tid):
            def cb(error, _s):
                with ended:
                    done[tid] = error
                    ended.notify_all()

            return cb

        ranks[0].send(1, 1, {"tokens": []}, stream, on_done(1))
        stream.put(0, torch.randn(shape))
        stream.fail("the step raised")
        with pytest.raises(TransferFailedError, match="aborted: the step raised"):
            ranks[1].wait_arrival(1, 10.0)
        with ended:
            assert ended.wait_for(lambda: 1 in done, 10.0)
        assert "prefill failed" in done[1]
        layers = [torch.randn(shape) for _ in range(4)]
        ranks[0].send(2, 1, {"tokens": []}, layers, on_done(2))
        arrival = ranks[1].wait_arrival(2, 10.0)
        assert all(torch.equal(a, b) for a, b in zip(arrival.layers, layers, strict=True))
    finally:
        for r in ranks:
            r.close()
