"""FlexiCache in the engine: a re-ranking step with several offloaded requests issues its
ranking, slot allocation, evictions and fetches for every request and layer without reading
device values on the host (each such read is a wait on the device on CUDA); hand-offs read
the head classes once per step. The tokens equal those of the modeled page lists (nothing
offloaded, the same kept pages read from the paged cache)."""

from __future__ import annotations

import pytest
import torch

from moska import LLM
from moska.bench.flexicache_engine_reads import run
from moska.flexicache import FlexiCacheConfig
from moska.flexicache.engine_hook import FlexiEngine


def _prompts(n: int, length: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 200 for j in range(length + 3 * i)] for i in range(n)]


def _engine(llm, threshold: float, attach: bool, r: int = 2, shared: bool = True) -> FlexiEngine:
    """A hook of the default's form (`slots=shared`; `shared=False`: per-layer pools)."""
    runner, bm = llm.engine.runner, llm.engine.block_manager
    cfg = FlexiCacheConfig(
        top_k_pages=2, recent_pages=1, sink_pages=1, threshold=threshold, rerank_interval=r,
        shared_slots=shared,
    )  # fmt: skip
    bm.free_listeners.clear()
    dev = runner.cache.k[0].device
    eng = FlexiEngine(cfg, runner.mcfg.num_kv_layers, runner.num_kv_heads, 4, dev)
    if attach:
        eng.attach(bm, runner.cache)
        eng.min_saving = 0
        eng.extend_pages = 1  # a later hand-off at each page that leaves the recent window
    runner.flexi = eng
    bm.reset_prefix_cache()
    return eng


def _check_reads(eng: FlexiEngine, steps: list[dict]) -> None:
    rerank = [s for s in steps if s["rerank_offloaded"] >= 2 and not s["hand_offs"]]
    assert len(rerank) >= 2, steps  # re-rankings of several offloaded requests at once
    assert all(s["reads"] == 0 for s in steps if not s["hand_offs"]), steps
    assert max(s["reads"] for s in steps if s["hand_offs"]) == 1, steps  # the head classes
    assert sum(s["extensions"] for s in steps) > 0
    assert eng.fetched_pages > 0 and not eng.requests


def test_engine_rerank_steps_read_nothing_back_and_equal_the_modeled_lists(flexi_llm):
    """Every head stable: the offloaded requests read the same pages as the modeled page
    lists (nothing offloaded); 6 requests of 60+ tokens in 64 blocks of 4: some wait for
    blocks that hand-offs free, so the two runs schedule them differently. Requests re-rank
    at the engine's steps (`FlexiEngine.clock`): r = 1, so that what each one reads does not
    depend on when it was admitted."""
    llm = flexi_llm
    prompts = _prompts(6, 60)
    _engine(llm, 0.0, attach=False, r=1)
    _, modeled = run(llm.engine, prompts, 12, count=False)
    eng = _engine(llm, 0.0, attach=True, r=1)
    steps, got = run(llm.engine, prompts, 12)
    assert got == modeled
    assert eng.offloads == len(prompts) and eng.mixed_steps > 0
    _check_reads(eng, steps)
    assert llm.engine.block_manager.allocator.num_used == 0


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "layer"])
def test_engine_rerank_reads_with_stable_and_unstable_heads(flexi_llm, shared):
    eng = _engine(flexi_llm, 0.5, attach=True, shared=shared)
    assert (eng.slot_offsets is not None) == shared
    steps, _ = run(flexi_llm.engine, _prompts(4, 36), 10)
    assert 0 < eng.stats()["stable_fraction"] < 1
    _check_reads(eng, steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_rerank_reads_nothing_back_on_cuda():
    """On a GPU: pages fetched from the pinned host copies in place (`gather_rows`; its host
    fallback would read), the same tokens as the modeled page lists."""
    llm = LLM(
        None, device="cuda", dtype="float32", num_kv_blocks=64, block_size=4,
        flexicache="k=2,recent=1,sink=1,threshold=2,r=2",
    )  # fmt: skip
    test_engine_rerank_steps_read_nothing_back_and_equal_the_modeled_lists(llm)
    assert llm.engine.runner.cache.k[0].is_cuda
