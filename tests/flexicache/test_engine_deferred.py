"""The engine's FlexiCache default (deferred re-ranking, pages held until their next
re-ranking: `FlexiCacheConfig.rerank`, `hold_unranked`) decodes the same tokens, with the
same logprobs, as the bench's page store (`store.FlexiKV` in deferred mode, `decode.py`) on
the engine's tiny model, over steps that cross several re-rankings and page starts: with
the pages modeled (read from the paged cache) and with real hand-offs to host memory."""

from __future__ import annotations

import math

import pytest
import torch

from moska import SamplingParams
from moska.flexicache import FlexiCacheConfig
from moska.flexicache.decode import decode_step, prefill
from moska.flexicache.engine_hook import FlexiEngine
from moska.flexicache.store import FlexiKV
from moska.kernels.paged_heads import paged_decode_heads_ref

# every head stable (threshold 0): both paths classify at their first decode step (the store
# compares with its prompt's ranking, the engine with none); r = 3 against 4-token pages:
# re-rankings at every phase of a page, pages leaving the window between them (held)
CFG = FlexiCacheConfig(
    top_k_pages=2, recent_pages=1, sink_pages=1, threshold=0.0, rerank_interval=3
)
PROMPT, TOKENS = 33, 17  # 9 pages; re-rankings after steps 3, 6, .., 15; 4 page starts


def _prompts() -> list[list[int]]:
    return [[(11 * i + 5 * j + j * j) % 250 for j in range(PROMPT)] for i in range(2)]


def _store_reference(model, cfg: FlexiCacheConfig, n_layers: int, hkv: int, d: int):
    """Greedy tokens and their logprobs from the page store, deferred as `cfg` says."""
    ids = torch.tensor(_prompts())
    store = FlexiKV(
        cfg, num_layers=n_layers, batch=2, num_kv_heads=hkv, head_dim=d, block_size=4,
        max_pages=-(-(PROMPT + TOKENS) // 4), dtype=torch.float32, device="cpu",
    )  # fmt: skip
    store.deferred_rerank = cfg.rerank == "deferred"
    store.hold_unranked = cfg.hold_unranked
    logits = prefill(model, store, ids)
    toks, lps = [], []
    for i in range(TOKENS):
        lp = torch.log_softmax(logits.float(), -1)
        tok = lp.argmax(-1)
        toks.append(tok.tolist())
        lps.append(lp.gather(1, tok[:, None])[:, 0].tolist())
        if i < TOKENS - 1:
            logits = decode_step(model, store, tok, paged_decode_heads_ref)
    kept = store.resident_pages()
    return [list(t) for t in zip(*toks)], [list(x) for x in zip(*lps)], kept


def _engine_run(llm, cfg: FlexiCacheConfig, attach: bool):
    runner, bm = llm.engine.runner, llm.engine.block_manager
    bm.free_listeners.clear()
    eng = FlexiEngine(cfg, runner.mcfg.num_kv_layers, runner.num_kv_heads, 4, runner.device)
    if attach:
        eng.attach(bm, runner.cache)
        eng.min_saving = 0
        eng.extend_pages = 1
    runner.flexi = eng
    bm.reset_prefix_cache()
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate(_prompts(), params)
    toks = [list(o.outputs[0].token_ids) for o in outs]
    lps = [[lp.logprob for lp in o.outputs[0].logprobs] for o in outs]
    return eng, toks, lps


@pytest.fixture(scope="module")
def reference(_flexi_llm_built):
    llm, _ = _flexi_llm_built
    r = llm.engine.runner
    d = r.mcfg.head_dim
    return _store_reference(r.model, CFG, r.mcfg.num_kv_layers, r.num_kv_heads, d)


@pytest.mark.parametrize("attach", [False, True], ids=["modeled", "offloaded"])
def test_engine_default_equals_the_bench_store(flexi_llm, reference, attach):
    assert FlexiCacheConfig().rerank == "deferred" and FlexiCacheConfig().hold_unranked
    ref_toks, ref_lps, _ = reference
    eng, toks, lps = _engine_run(flexi_llm, CFG, attach)
    assert toks == ref_toks
    for a, b in zip(lps, ref_lps):
        assert a == pytest.approx(b, abs=2e-4)
    assert eng.stats()["kept_fraction"] < 0.8  # pages were dropped
    if attach:
        assert eng.offloads == 2 and eng.extensions > 0 and eng.fetched_pages > 0
        assert flexi_llm.engine.block_manager.allocator.num_used == 0


def test_hold_and_in_step_ranking_read_other_pages(flexi_llm, reference):
    """The store's reference differs from the engine without hold and ranking in the step
    (what the first test checks is not trivially equal)."""
    _, ref_lps, _ = reference
    for cfg in (
        FlexiCacheConfig(**{**CFG.__dict__, "hold_unranked": False}),
        FlexiCacheConfig(**{**CFG.__dict__, "rerank": "step"}),
    ):
        _, _, lps = _engine_run(flexi_llm, cfg, attach=False)
        gap = max(abs(a - b) for x, y in zip(lps, ref_lps) for a, b in zip(x, y))
        assert gap > 1e-3 and math.isfinite(gap), cfg


def test_config_rerank_and_hold_parse():
    cfg = FlexiCacheConfig.parse("k=4,rerank=step,hold=off,r=8")
    assert (cfg.rerank, cfg.hold_unranked, cfg.rerank_interval) == ("step", False, 8)
    assert FlexiCacheConfig.parse("on").rerank_interval == 16
    with pytest.raises(ValueError, match="hold=on or hold=off"):
        FlexiCacheConfig.parse("hold=maybe")
    with pytest.raises(ValueError, match="rerank must be"):
        FlexiCacheConfig.parse("rerank=spread")
