"""Helix with libraries, and a killed rank, on the real engine path (`LLMEngine.from_model(
..., helix=True)`: rank 0 here, rank 1 started by `DistributedRuntime.start`, its monitor and
heartbeats), 2 ranks (KVP 2 x TPA 1) on the tiny Llama, gloo. The rank is forked from the
gloo_ranks forkserver (conftest.py: torch and the engine imported once) instead of spawned (a
fresh interpreter: ~7 s of imports on 2 loaded cores); nothing else differs.

Each rank holds the library's KV (replicated) and attends its half of every layer's
selections, merged with its shard of the unique KV by LSE before the all-to-all: fp32 logits
rel err < 1e-4 and greedy tokens equal one process, reading every chunk and routed (a
selection attended on both ranks or on neither would change the output), also for a
position-independent library with APE tempering (its LSE bias added to each rank's slice).
4 ranks (TPA 2,
routing scores exchanged between the groups) and HOP-B: test_helix.py. Last: rank 1 is
killed while a library request decodes; the engine raises RankFailedError naming it within
10 s, then refuses requests at once, and the server (which served a library request over
HTTP before) answers 503 naming it."""

from __future__ import annotations

import time

import pytest
import torch
from helix_support import CHUNK, DOCS, LIB_PROMPTS, greedy_library, library_logits
from tp_support import EnginePair, build_checkpoint, engine_kwargs, kill_rank_mid_step, rel_err

from moska.distributed.errors import RankFailedError
from moska.distributed.helix_library import own_part
from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams
from moska.kernels.selections import Selections
from moska.library.positions import IndependentOptions
from moska.routing.policy import RoutingPolicy

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    base = tmp_path_factory.mktemp("helixlib")
    path = str(build_checkpoint(base / "m", seed=6))
    kw = engine_kwargs("cpu", library_root=str(base / "libraries"))
    ref = LLMEngine.from_model(path, **kw)
    ref.libraries.progress = False
    ref.libraries.build("docs", DOCS, chunk_size=CHUNK)
    ape = IndependentOptions(temperature=1.5, log_scale=0.7)  # the library part tempered
    ref.libraries.build("ape", DOCS, chunk_size=CHUNK, mode="independent", independent=ape)
    pair = EnginePair(
        ref, lambda: LLMEngine.from_model(path, **kw, helix=True, decode_context_parallel_size=2)
    )
    try:
        yield pair
    finally:
        pair.shutdown()


def test_own_parts_cover_every_selection_once():
    n = 23
    sel = Selections(*(torch.randint(0, 9, (n,), dtype=torch.int32) for _ in range(3)))
    for kvp in (2, 3, 4):
        sizes = [own_part(sel, j, kvp).req.numel() for j in range(kvp)]
        assert max(sizes) - min(sizes) <= 1  # equal work per rank
        for f in ("req", "kv_head", "chunk"):  # disjoint, complete, in order
            parts = [getattr(own_part(sel, j, kvp), f) for j in range(kvp)]
            assert torch.equal(torch.cat(parts), getattr(sel, f))


# summed over KV heads and two-stage routing (scores exchanged when TPA > 1): test_helix.py
@pytest.mark.parametrize("name,top_k", [("docs", 6), ("docs", 2), ("ape", 6)])
def test_library_logits_equal_one_process(engines, name, top_k):
    ref, helix = engines
    policy = RoutingPolicy()
    want = library_logits(ref, name, top_k, policy)
    got = library_logits(helix, name, top_k, policy)
    assert got.shape == want.shape == (sum(map(len, LIB_PROMPTS)), 256)
    assert rel_err(got, want) < 1e-4
    if top_k < 6:  # routing dropped chunks that matter: not the all-chunks output
        assert rel_err(want, library_logits(ref, name, 6, RoutingPolicy())) > 1e-3
    assert helix.libraries.get(name).build_id in helix.dist.channel.worker_builds


def test_routing_report_equals_one_process(engines):
    """Rank 0 reports the whole selection (not its slice) and its coverage."""
    ref, helix = engines
    want: list = []
    got: list = []
    library_logits(ref, "docs", 2, RoutingPolicy(), want)
    library_logits(helix, "docs", 2, RoutingPolicy(), got)
    (w,), (g,) = want, got
    assert set(g.selections) == set(w.selections) == {0, 1}
    for layer in (0, 1):
        for f in ("req", "kv_head", "chunk"):
            assert torch.equal(getattr(g.selections[layer], f), getattr(w.selections[layer], f))
    assert 0 < float(w.coverage[1].min()) and float(w.coverage[1].max()) < 1  # 2 of 6 chunks
    torch.testing.assert_close(g.coverage[1], w.coverage[1], rtol=1e-5, atol=1e-6)


def test_library_greedy_tokens_equal_one_process(engines):
    ref, helix = engines
    before = helix.runner.attention.exchanges
    got = greedy_library(helix, "docs", 6, 2)  # routed (every chunk: the logits tests)
    assert got == greedy_library(ref, "docs", 6, 2)
    assert len(got["lib0"]) == 6 and helix.runner.attention.exchanges > before
    assert helix.libraries.num_users("docs") == 0  # every request released its build
    assert helix.runner.cache.k.shape[-2] == 2  # TPA 1: every KV head, half the blocks


def test_rank_dies_during_a_library_request(engines, caplog):
    """Last: a library request over HTTP is served; then rank 1 is killed while one decodes."""
    import httpx

    from moska.server.app import create_app
    from moska.server.background import background_server
    from moska.server.settings import ServerSettings

    _, helix = engines
    body = {"model": helix.model_name, "prompt": [5, 6], "max_tokens": 3, "library": "docs"}
    with background_server(create_app(helix, ServerSettings())) as url:  # served over HTTP
        ok = httpx.post(f"{url}/v1/completions", json={**body, "ignore_eos": True}, timeout=30)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 3
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    helix.add_request("dying", LIB_PROMPTS[0], params, library="docs", top_k_chunks=2)
    helix.step()  # its prefill
    helix.step()  # a decode step
    _, t0 = kill_rank_mid_step(helix, 1)
    with pytest.raises(RankFailedError, match="rank 1"):  # at once, no collective
        helix.add_request("after", [1, 2], SamplingParams(max_tokens=2))
    assert any("rank 1" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    with background_server(create_app(helix, ServerSettings())) as url:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert time.monotonic() - t0 < 10
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "rank_failed" and "rank 1" in r.json()["error"]["message"]
