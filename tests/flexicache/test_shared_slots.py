"""FlexiCache's page pool as one slot space for all layers (`--flexicache slots=shared`,
`flexicache/shared_slots.py`): the engine decodes the bench store's tokens with the same
logprobs with real hand-offs, as the per-layer pool does, and its pool is sized by the sum
over layers: with a layer whose heads are all unstable (which sizes a per-layer pool at
every page) a hand-off still frees blocks."""

from __future__ import annotations

import pytest

from moska.flexicache import FlexiCacheConfig
from moska.flexicache.offload import pool_blocks_needed
from moska.flexicache.shared_slots import blocks_needed
from tests.flexicache.test_engine_deferred import CFG, _engine_run, _store_reference

SHARED = FlexiCacheConfig(**{**CFG.__dict__, "shared_slots": True})


@pytest.fixture(scope="module")
def reference(_flexi_llm_built):
    llm, _ = _flexi_llm_built
    r = llm.engine.runner
    return _store_reference(r.model, CFG, r.mcfg.num_kv_layers, r.num_kv_heads, r.mcfg.head_dim)


def test_shared_slots_engine_equals_the_bench_store(flexi_llm, reference):
    ref_toks, ref_lps, _ = reference
    eng, toks, lps = _engine_run(flexi_llm, SHARED, attach=True)
    assert eng.slot_offsets is not None and eng.flat_caches() is not None
    assert toks == ref_toks
    for a, b in zip(lps, ref_lps):
        assert a == pytest.approx(b, abs=2e-4)
    assert eng.offloads == 2 and eng.extensions > 0 and eng.fetched_pages > 0
    assert flexi_llm.engine.block_manager.allocator.num_used == 0


def test_pool_sized_by_the_sum_over_layers():
    cfg = FlexiCacheConfig(top_k_pages=4, sink_pages=1)
    # 8 heads, 100 pages; one layer with no stable head: a per-layer pool keeps every page
    n_stable = [8, 8, 8, 0]
    assert pool_blocks_needed(cfg, n_stable, 8, 100) == 100
    assert blocks_needed(cfg, n_stable, 8, 100) == -(-(3 * 8 * 5 + 8 * 100) // 32) == 29
    assert FlexiCacheConfig.parse("slots=shared").shared_slots
    with pytest.raises(ValueError, match="slots=layer"):
        FlexiCacheConfig.parse("slots=all")


def test_shared_slots_equal_per_layer_pools_with_unstable_heads(flexi_llm):
    """Stable and unstable heads (threshold 0.5), hand-offs and later ones: the same pages
    are read from other slots, so the tokens and logprobs are the per-layer pool's. Plain
    steps replay from (fake, on the CPU) graphs kept across both runs: a graph captured for
    per-layer slots must not be replayed for global ones (it reads the layer's cache)."""
    from moska.flexicache.engine_graphs import PlainGraphs

    runner = flexi_llm.engine.runner
    saved = runner.flexi_graphs
    if saved is None:
        runner.flexi_graphs = PlainGraphs(runner.model, runner.attention, runner.device, fake=True)
    mixed = FlexiCacheConfig(**{**CFG.__dict__, "threshold": 0.5, "shared_slots": False})
    try:
        layer, toks, lps = _engine_run(flexi_llm, mixed, attach=True)
        assert layer.slot_offsets is None  # per-layer pools (`on` is slots=shared)
        shared, toks2, lps2 = _engine_run(
            flexi_llm, FlexiCacheConfig(**{**mixed.__dict__, "shared_slots": True}), attach=True
        )
        assert runner.flexi_graphs.replays > 0
    finally:
        runner.flexi_graphs = saved
    assert 0 < shared.stats()["stable_fraction"] < 1
    assert shared.offloads == layer.offloads > 0 and shared.fetched_pages > 0
    assert toks2 == toks
    for a, b in zip(lps, lps2):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_shared_slots_on_cuda_equal_per_layer_pools():
    """On a GPU: the per-head kernel reads the cache as one [L * N, ...] tensor with global
    slots; the same tokens as per-layer pools (pages from the pinned host pool)."""
    from moska import LLM

    llm = LLM(
        None, device="cuda", dtype="float32", num_kv_blocks=64, block_size=4,
        flexicache="k=2,recent=1,sink=1,threshold=2,r=2",
    )  # fmt: skip
    llm.engine.block_manager.free_listeners.clear()
    test_shared_slots_equal_per_layer_pools_with_unstable_heads(llm)
