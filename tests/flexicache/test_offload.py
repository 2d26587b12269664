"""FlexiCache's real offload in the engine (moska/flexicache/offload.py): released blocks,
the per-head pool in the block cache, and what the scheduler admits with the freed blocks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moska import SamplingParams
from moska.flexicache import FlexiCacheConfig
from moska.flexicache.engine_hook import FlexiEngine


@pytest.fixture
def llm(flexi_llm):
    return flexi_llm


def _engine(
    llm, spec_threshold: float, attach: bool, min_saving: int = 0, spec: str = "on"
) -> FlexiEngine:
    """A fresh FlexiCache hook on the module's engine (its build dominates the test time):
    `spec` (default `--flexicache on`: slots=shared, deferred, held pages) scaled down to
    the tiny model's pages (K = 2, one recent and one sink page, r = 2)."""
    runner = llm.engine.runner
    cfg = replace(FlexiCacheConfig.parse(spec), top_k_pages=2, recent_pages=1, sink_pages=1,
                  threshold=spec_threshold, rerank_interval=2)  # fmt: skip
    bm = llm.engine.block_manager
    bm.free_listeners.clear()
    layers, heads = runner.mcfg.num_kv_layers, runner.num_kv_heads
    eng = FlexiEngine(cfg, layers, heads, 4, torch.device("cpu"))
    if attach:
        eng.attach(bm, runner.cache)
        eng.min_saving = min_saving
        eng.extend_pages = 1  # a later hand-off at each page that leaves the recent window
    runner.flexi = eng
    return eng


def _run(llm, prompts, late_prompt, max_tokens=10):
    """Prompts decode; `late_prompt` arrives after 6 steps (a mixed step with offloaded
    decodes). Returns each request's (token ids, logprobs)."""
    eng = llm.engine
    eng.block_manager.reset_prefix_cache()  # every run computes its prompts: a mixed step
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    done: dict[str, list] = {}
    steps = 0
    while eng.has_unfinished_requests():
        if steps == 6 and late_prompt is not None:
            eng.add_request("late", late_prompt, params)
        for out in eng.step():
            if out.finished:
                lps = [lp.logprob for lp in out.outputs[0].logprobs]
                done[out.request_id] = [out.outputs[0].token_ids, lps]
        steps += 1
    assert eng.block_manager.allocator.num_used == 0
    return done


PROMPTS = [[(7 * i + j) % 200 for j in range(30 + 5 * i)] for i in range(2)]
LATE = [(3 * j + 1) % 200 for j in range(9)]


def _same(a, b):
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid][0] == b[rid][0], rid
        assert a[rid][1] == pytest.approx(b[rid][1], abs=1e-5), rid


SPECS = ["on", "slots=layer"]  # the default (one slot space for all layers), per-layer pools


@pytest.mark.parametrize("spec", SPECS)
def test_offloaded_all_unstable_equals_full_kv(llm, spec):
    llm.engine.runner.flexi = None
    full = _run(llm, PROMPTS, LATE)
    eng = _engine(llm, 2.0, attach=True, spec=spec)  # every head unstable: all pages kept
    assert eng.cfg.shared_slots == (spec == "on")
    got = _run(llm, PROMPTS, LATE)
    _same(full, got)
    assert eng.offloads == 3 and eng.released_blocks >= 2 * 6  # the late one too
    assert eng.extensions > 0  # later hand-offs (pool grown for the unstable heads)
    assert eng.mixed_steps >= 1  # the late prompt's prefill ran with offloaded decodes
    assert not eng.requests and eng.host_bytes() == 0


@pytest.mark.parametrize("spec", SPECS)
def test_offloaded_stable_heads_equal_the_modeled_page_lists(llm, spec):
    """Stable heads read the same pages from the pool (fetched at re-rankings) as from the
    paged cache when nothing is offloaded (decode-only steps: in a mixed step the modeled
    path reads every page)."""
    _engine(llm, 0.0, attach=False, spec=spec)
    modeled = _run(llm, PROMPTS, None)
    eng = _engine(llm, 0.0, attach=True, min_saving=1, spec=spec)
    got = _run(llm, PROMPTS, None)
    _same(modeled, got)
    assert eng.offloads >= 2 and eng.released_blocks > 0
    assert eng.stats()["fetched_pages"] > 0  # re-rankings fetched promoted pages
    assert eng.extensions > 0  # pages that left the recent window later were offloaded too


def test_abort_frees_host_copy_and_pool(llm):
    eng = _engine(llm, 0.0, attach=True)
    bm = llm.engine.block_manager
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm.engine.add_request("a", PROMPTS[1], params)
    while eng.offloads == 0:
        llm.engine.step()
    st = eng.requests["a"]
    assert st.off is not None and eng.host_bytes() > 0
    pool = list(st.off.pool)
    assert all(b in bm._extra["a"] for b in pool) and -1 in bm.block_table("a")
    bm.check_integrity()
    llm.engine.abort_request("a")
    assert not eng.requests and eng.host_bytes() == 0
    assert bm.allocator.num_used == 0 and "a" not in bm._extra
    llm.engine.step()


def _max_running(llm, n, prompt_len, max_tokens):
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(n):
        eng.add_request(f"m{i}", [(5 * i + j) % 200 for j in range(prompt_len)], params)
    most = 0
    while eng.has_unfinished_requests():
        eng.step()
        most = max(most, eng.scheduler.num_running)
    return most


def test_same_block_budget_runs_more_long_requests(llm):
    """64 blocks of 4 tokens; 6 requests of 60 + 24 tokens (15 blocks to start, 21 at the
    end): at most 4 at a time with full KV (then preempted down as they grow); with
    FlexiCache, once a request is offloaded (3 pool blocks + the recent ones in place of its
    14+ old blocks) the freed blocks admit all 6."""
    llm.engine.runner.flexi = None
    full = _max_running(llm, 6, 60, 24)
    eng = _engine(llm, 0.0, attach=True)
    flex = _max_running(llm, 6, 60, 24)
    assert full <= 4 and flex == 6, (full, flex)
    assert eng.offloads >= 3 and llm.engine.block_manager.allocator.num_used == 0


def test_preempted_offloaded_request_frees_host_copy_and_pool(llm, monkeypatch):
    """Requests that outgrow the budget after their offload are preempted (recompute): their
    host copy and pool blocks go at once; they later run again and finish. (Later hand-offs
    off: with them these requests stop growing in blocks and are not preempted.)"""
    eng = _engine(llm, 0.0, attach=True)
    eng.extend_pages = 10**6
    sched, bm = llm.engine.scheduler, llm.engine.block_manager
    seen = []
    preempt = sched._preempt

    def spy(request):
        had = eng.requests.get(request.request_id)
        preempt(request)
        gone = request.request_id not in eng.requests and request.request_id not in bm._extra
        seen.append((had is not None and had.off is not None, gone))

    monkeypatch.setattr(sched, "_preempt", spy)
    _max_running(llm, 5, 60, 52)
    assert any(off for off, _ in seen) and all(gone for _, gone in seen), seen
    assert not eng.requests and bm.allocator.num_used == 0
