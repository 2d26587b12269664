"""Nothing admitted is dropped by P/D bookkeeping (#19, the 2-GPU trace's failures):

- a decode instance holds a transfer's blocks (`pd-hold-*`) while it has no unfinished
  request; with asynchronous scheduling (on by default on a GPU) the step after a request
  ended with its last token in flight schedules nothing, and must not take the hold for a
  leak ("blocks held with no unfinished request" failed every request on the instance);
- a prefill step whose module hooks never run (a CUDA graph replays every one-token step,
  and a re-prefill of a prompt whose blocks are all cached is one) still completes its
  layer stream, with the KV the hooks would have read ("the prefill step ended before its
  KV was read", twice, since the retry went to the same prefill instance);
- a transfer that fails twice no longer fails the request: the decode instance computes the
  prompt itself and the tokens are those of a colocated instance.
"""

from __future__ import annotations

import contextlib
import random

import httpx
import pytest
import torch

from moska.engine.sampling_params import SamplingParams
from moska.pd import kv_blocks
from moska.pd.stream import LayerCapture, stream_for

pytestmark = pytest.mark.timeout(120)  # pd_cluster (session) may start here


def _drain(engine, max_steps: int = 100) -> None:
    for _ in range(max_steps):
        engine.step()
        if not engine.has_unfinished_requests():
            return
    raise AssertionError("the requests did not finish")


def test_an_async_step_with_a_transfer_held_and_no_request_left():
    from tests.pd.conftest import make_engine

    engine = make_engine(async_scheduling=True)
    assert engine.async_scheduling
    bm, cache = engine.block_manager, engine.runner.cache
    bs, n = bm.block_size, 2
    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(2, n, *cache.k.shape[2:], generator=gen) for _ in cache.k]
    meta = {"tokens": list(range(10, 10 + n * bs)), "namespace": [None, None], "block_size": bs}
    holder = kv_blocks.inject(engine, "pd-hold-7", meta, layers)
    assert holder is not None and bm.allocator.num_used == n
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request("a", list(range(100, 130)), params)
    _drain(engine)  # the last step schedules nothing: the old check raised there
    assert bm.block_table("pd-hold-7") and bm.allocator.num_used == n  # the hold is intact
    for i, kv in enumerate(layers):  # and so is its KV
        ids = torch.tensor(bm.block_table("pd-hold-7"))
        torch.testing.assert_close(cache.k[i].index_select(0, ids), kv[0], rtol=0, atol=0)
    kv_blocks.release(engine, holder)
    engine.step()  # nothing held now, nothing to do
    assert bm.allocator.num_used == 0
    bm.check_integrity()


@contextlib.contextmanager
def _graph_replays(engine, replays: list):
    """Run each one-token step the way a CUDA graph replay does: the forward runs, no
    module hook does."""
    runner = engine.runner
    attns = [layer.self_attn for layer in runner.model.decoder_layers]
    launch = runner.launch

    def replayed(scheduled, *args, **kwargs):
        if not all(item.num_new_tokens == 1 for item in scheduled):
            return launch(scheduled, *args, **kwargs)
        saved = [dict(m._forward_hooks) for m in attns]
        for m in attns:
            m._forward_hooks.clear()
        try:
            replays.append([item.request.request_id for item in scheduled])
            return launch(scheduled, *args, **kwargs)
        finally:
            for m, hooks in zip(attns, saved, strict=True):
                m._forward_hooks.update(hooks)

    runner.launch = replayed
    try:
        yield
    finally:
        runner.launch = launch


def test_a_replayed_one_token_prefill_step_completes_its_stream():
    from tests.pd.conftest import make_engine

    engine = make_engine()
    bs = engine.block_manager.block_size
    streams, replays = {}, []

    def on_step(scheduled):
        out = []
        for item in scheduled:
            req = item.request
            if req.num_computed_tokens + item.num_new_tokens == req.num_tokens:
                streams[req.request_id] = stream_for(engine, req)[1]
                out.append((req, streams[req.request_id]))
        return out

    rng = random.Random(3)
    prompt = [rng.randrange(10, 250) for _ in range(3 * bs + 1)]  # 3 blocks + 1 token
    with _graph_replays(engine, replays):
        cap = LayerCapture.install(engine, on_step)
        for rid in ("first", "again"):  # "again": all 3 blocks cached, a one-token step
            engine.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0))
            _drain(engine)
        cap.remove()
    assert ["again"] in replays and ["first"] not in replays
    first, again = streams["first"], streams["again"]
    assert again.complete()
    for i in range(len(first)):
        ref = first.layer(i, 1.0)
        assert ref.shape[1] == 3 and ref.abs().sum() > 0
        torch.testing.assert_close(again.layer(i, 1.0), ref, rtol=0, atol=0)


def test_a_transfer_failing_twice_is_served_by_the_decode_instance(pd_cluster, monkeypatch):
    url, urls, apps, front = pd_cluster
    cap = apps["prefill0"].state.pd.capture
    assert cap is not None
    on_step = cap.on_step

    def failing(scheduled):  # no layer reaches a stream: each fails as the step ends
        out = on_step(scheduled)
        for _, stream in out:
            stream.put = lambda *_a, **_k: None
        return out

    monkeypatch.setattr(cap, "on_step", failing)
    ids = list(range(11, 11 + 50))
    body = {"model": "moska-tiny", "prompt": ids, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    before = (front.stats.transfer_failures, front.stats.decode_prefills, front.stats.failed)
    computed = {n: apps[n].state.moska.engine.stats().prompt_tokens_computed for n in apps}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    after = (front.stats.transfer_failures, front.stats.decode_prefills, front.stats.failed)
    assert after == (before[0] + 2, before[1] + 1, before[2])
    computed = {
        n: apps[n].state.moska.engine.stats().prompt_tokens_computed - c
        for n, c in computed.items()
    }
    assert sorted([computed["decode0"], computed["decode1"]]) == [0, 50]  # the whole prompt
    monkeypatch.undo()
    colocated = httpx.post(f"{urls['prefill0']}/v1/completions", json=body, timeout=60)
    assert r.json()["choices"][0]["text"] == colocated.json()["choices"][0]["text"]
    assert r.json()["usage"]["completion_tokens"] == 5
