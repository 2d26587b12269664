"""FlexiCache's host pool (`flexicache/host_pool.py`): one host buffer, allocated when the
engine starts, that every hand-off's host copy is carved from (each hand-off allocated its
own pinned tensors before: one H200 step of 38 hand-offs took 4.6 s). Ranges come back when
a request goes and merge with their free neighbours; the engine decodes the same tokens
with the pool, without it and with a pool too small for every copy (those fall back to
their own allocation, counted)."""

from __future__ import annotations

import pytest
import torch

from moska import SamplingParams
from moska.flexicache import FlexiCacheConfig
from moska.flexicache.engine_hook import FlexiEngine
from moska.flexicache.host_pool import HostPool

CFG = FlexiCacheConfig(
    top_k_pages=2, recent_pages=1, sink_pages=1, threshold=0.0, rerank_interval=3
)


def test_pool_first_fit_merges_and_refuses_double_free():
    pool = HostPool(10, (2, 3, 4, 5), torch.float32, pin=False)
    a, va = pool.take(4)
    b, vb = pool.take(3)
    assert (a, b) == (0, 4) and va.shape == (2, 4, 3, 4, 5) and pool.free_pages() == 3
    va.fill_(1.0)
    vb.fill_(2.0)
    assert float(pool.view(0, 4).sum()) == 4 * 120 and float(pool.view(4, 3).mean()) == 2.0
    assert pool.take(4) is None  # 3 free at the end
    pool.give(a, 4)
    assert pool.take(5) is None and pool.largest_free() == 4  # 0..3 and 7..9 apart
    pool.give(b, 3)  # merges both neighbours: one range of 10
    assert pool.largest_free() == 10 and pool.used_pages == 0 and pool.peak_pages == 7
    with pytest.raises(ValueError, match="already free"):
        pool.give(2, 1)
    c, _ = pool.take(10)
    assert c == 0 and pool.free_pages() == 0


def test_config_host_parse():
    assert FlexiCacheConfig.parse("host=12.5").host_gib == 12.5
    assert FlexiCacheConfig.parse("host=auto").host_gib == -1 == FlexiCacheConfig().host_gib
    with pytest.raises(ValueError, match="host"):
        FlexiCacheConfig.parse("host=lots")
    with pytest.raises(ValueError, match="host"):
        FlexiCacheConfig.parse("host=-3")


def _prompts() -> list[list[int]]:
    return [[(13 * i + 7 * j + j * j) % 250 for j in range(30 + 5 * i)] for i in range(3)]


def _run(llm, host_gib: float, pool_pages: int | None = None):
    """Greedy tokens, logprobs and the hook, with real hand-offs; `pool_pages`: a pool of
    that many pages instead of the one `host_gib` makes."""
    runner, bm = llm.engine.runner, llm.engine.block_manager
    bm.free_listeners.clear()
    cfg = FlexiCacheConfig(**{**CFG.__dict__, "host_gib": host_gib})
    eng = FlexiEngine(cfg, runner.mcfg.num_kv_layers, runner.num_kv_heads, 4, runner.device)
    eng.attach(bm, runner.cache)
    if pool_pages is not None:
        assert eng.host_pool is not None
        old = eng.host_pool
        eng.host_pool = HostPool(pool_pages, old.page_shape, old.buffer.dtype, old.pin)
    eng.min_saving, eng.extend_pages = 0, 1
    runner.flexi = eng
    bm.reset_prefix_cache()
    buf = eng.host_pool.buffer.data_ptr() if eng.host_pool is not None else None
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=1)
    outs = llm.generate(_prompts(), params)
    if buf is not None:  # allocated once: every copy was a view of it
        assert eng.host_pool is not None and eng.host_pool.buffer.data_ptr() == buf
    toks = [list(o.outputs[0].token_ids) for o in outs]
    lps = [[lp.logprob for lp in o.outputs[0].logprobs] for o in outs]
    return eng, toks, lps


def _check_pool(flexi_llm) -> FlexiEngine:
    none, toks0, lps0 = _run(flexi_llm, 0.0)
    assert none.host_pool is None and none.offloads == 3 and none.extensions > 0
    auto, toks1, lps1 = _run(flexi_llm, -1.0)
    pool = auto.host_pool
    assert pool is not None and auto.offloads == 3 and auto.extensions > 0
    assert pool.misses == 0 and pool.peak_pages > 0  # every copy (and its growth) in the pool
    assert pool.used_pages == 0 and pool.largest_free() == pool.pages  # all given back
    small, toks2, lps2 = _run(flexi_llm, -1.0, pool_pages=40)
    assert small.host_pool is not None and small.host_pool.misses > 0
    assert small.host_pool.peak_pages > 0 and small.host_pool.used_pages == 0
    assert toks0 == toks1 == toks2
    for a, b, c in zip(lps0, lps1, lps2):
        assert a == pytest.approx(b, abs=1e-5) and a == pytest.approx(c, abs=1e-5)
    assert flexi_llm.engine.block_manager.allocator.num_used == 0
    return auto


def test_engine_hand_offs_use_one_pool_and_give_it_back(flexi_llm):
    _check_pool(flexi_llm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_hand_offs_use_one_pinned_pool_on_cuda():
    """On a GPU the pool is pinned (fetches read it in place, `gather_rows`) and the copies
    of many requests, views of it, are read by one gather: same tokens as without it."""
    from moska import LLM

    llm = LLM(
        None, device="cuda", dtype="float32", num_kv_blocks=64, block_size=4,
        flexicache="k=2,recent=1,sink=1,threshold=2,r=2",
    )  # fmt: skip
    auto = _check_pool(llm)
    assert auto.host_pool is not None and auto.host_pool.buffer.is_pinned()
    assert llm.engine.runner.cache.k[0].is_cuda
