"""Later hand-offs made at the deferred re-ranking after the forward
(`FlexiEngine.extend_after`, spread: at most `extend_cap` per re-ranking) and a
`slots=shared` re-ranking's one sync of every layer (`shared_slots.sync_all`, in groups of
requests): the engine still decodes the bench store's tokens with real hand-offs, per-layer
and shared pools, with one later hand-off per re-ranking and with one request per fetch
group; on CUDA (pinned host copies read in place) shared equals per-layer pools."""

from __future__ import annotations

import pytest
import torch

from moska import SamplingParams
from moska.flexicache import FlexiCacheConfig, shared_slots
from moska.flexicache.engine_hook import FlexiEngine
from tests.flexicache.test_engine_deferred import CFG, TOKENS, _prompts, _store_reference

SHARED = FlexiCacheConfig(**{**CFG.__dict__, "shared_slots": True})  # the default's slots
LAYER = FlexiCacheConfig(**{**CFG.__dict__, "shared_slots": False})  # per-layer pools


@pytest.fixture(scope="module")
def reference(_flexi_llm_built):
    llm, _ = _flexi_llm_built
    r = llm.engine.runner
    return _store_reference(r.model, CFG, r.mcfg.num_kv_layers, r.num_kv_heads, r.mcfg.head_dim)


def _run(llm, cfg: FlexiCacheConfig, cap: int | None = None):
    """Greedy tokens and logprobs with real hand-offs; `cap`: later hand-offs per
    re-ranking (None: the engine's); also the later hand-offs each re-ranking made."""
    runner, bm = llm.engine.runner, llm.engine.block_manager
    bm.free_listeners.clear()
    eng = FlexiEngine(cfg, runner.mcfg.num_kv_layers, runner.num_kv_heads, 4, runner.device)
    eng.attach(bm, runner.cache)
    eng.min_saving, eng.extend_pages = 0, 1
    made: list[int] = []
    if cap is not None:
        eng.extend_cap = lambda batch: cap  # type: ignore[method-assign]
    after = eng.extend_after

    def counted(ids, states, seq_lens) -> bool:
        n = eng.extensions
        out = after(ids, states, seq_lens)
        made.append(eng.extensions - n)
        return out

    eng.extend_after = counted  # type: ignore[method-assign, assignment]
    runner.flexi = eng
    bm.reset_prefix_cache()
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate(_prompts(), params)
    toks = [list(o.outputs[0].token_ids) for o in outs]
    lps = [[lp.logprob for lp in o.outputs[0].logprobs] for o in outs]
    assert bm.allocator.num_used == 0
    return eng, toks, lps, made


@pytest.mark.parametrize("cfg", [LAYER, SHARED], ids=["layer", "shared"])
@pytest.mark.parametrize("cap", [None, 1], ids=["cap", "one"])
def test_later_hand_offs_at_rerankings_equal_the_bench_store(
    flexi_llm, reference, cfg, cap, monkeypatch
):
    ref_toks, ref_lps, _ = reference
    if cap == 1:  # and one request per fetch group of a shared re-ranking
        monkeypatch.setattr(shared_slots, "MAX_ENTRIES", 1)
    eng, toks, lps, made = _run(flexi_llm, cfg, cap)
    assert (eng.slot_offsets is not None) == cfg.shared_slots
    assert toks == ref_toks
    for a, b in zip(lps, ref_lps):
        assert a == pytest.approx(b, abs=2e-4)
    assert eng.rerank_reads_kept > 0 and eng.fetched_pages > 0
    assert eng.extensions_after == sum(made) > 0
    assert max(made) <= (cap or eng.extend_cap(2))
    if cap == 1:  # two requests in phase: their later hand-offs spread over re-rankings
        assert max(made) == 1 and sum(made) >= 2


def test_extend_cap_covers_the_batch():
    """Enough later hand-offs per re-ranking for every request to make one per
    `extend_pages` pages, with room to catch up (a batch in phase spreads out)."""
    eng = FlexiEngine(FlexiCacheConfig(rerank_interval=16), 4, 2, 16, torch.device("cpu"))
    eng.extend_pages = 8
    assert eng.extend_cap(1) == 2
    assert eng.extend_cap(23) == 2 * 3 and eng.extend_cap(36) == 2 * 5
    assert all(8 * eng.extend_cap(b) >= 2 * b for b in range(1, 65))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_sync_all_on_cuda_equals_per_layer_pools(monkeypatch):
    """On a GPU: one sync of every layer from the pinned host copies (groups of one
    request) and one later hand-off per re-ranking give the per-layer pools' tokens."""
    from moska import LLM

    llm = LLM(
        None, device="cuda", dtype="float32", num_kv_blocks=64, block_size=4,
        flexicache="k=2,recent=1,sink=1,threshold=2,r=2",
    )  # fmt: skip
    mixed = FlexiCacheConfig(**{**LAYER.__dict__, "threshold": 0.5})
    _, toks, lps, _ = _run(llm, mixed)
    monkeypatch.setattr(shared_slots, "MAX_ENTRIES", 1)
    eng, toks2, lps2, made = _run(
        llm, FlexiCacheConfig(**{**mixed.__dict__, "shared_slots": True}), cap=1
    )
    assert eng.extensions_after > 0 and eng.fetched_pages > 0 and max(made) == 1
    assert toks2 == toks
    for a, b in zip(lps, lps2):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("max_bytes", [1, 1 << 28], ids=["layer_chunks", "one_chunk"])
def test_batched_scores_equal_layer_by_layer(flexi_llm, monkeypatch, max_bytes):
    """A deferred re-ranking's scores of every layer at once (`batched_scores.scores_all`,
    in chunks of layers or one) equal the layer-by-layer scores, with released pages."""
    from moska.flexicache import batched_scores

    batched = batched_scores.scores_all
    checked: list[float] = []

    def both(step, q_buf, k_caches, sm_scale):
        got = batched(step, q_buf, k_caches, sm_scale)
        n_layers = step.eng.num_layers
        ref = torch.stack(
            [step._scores(i, q_buf[i], k_caches[i], sm_scale) for i in range(n_layers)], 1
        )
        err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
        checked.append(err)
        return got

    monkeypatch.setattr(batched_scores, "MAX_BYTES", max_bytes)
    monkeypatch.setattr(batched_scores, "scores_all", both)
    eng, _, _, _ = _run(flexi_llm, CFG)
    assert eng.offloads > 0 and checked and max(checked) < 1e-5, checked


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA"))],
)  # fmt: skip
def test_write_host_pages_equals_per_layer_copies(device, monkeypatch):
    """A hand-off's pages into a request's host copy in one write (on CUDA: one
    `gather_rows` into pinned memory in place) equal the per-layer copies, and nothing
    outside the target rows changes (fresh random data, a chunk of layers past the first,
    pages after some already there)."""
    from moska.flexicache import transfer
    from moska.flexicache.host_pool import HostPool
    from moska.flexicache.transfer import HOST_WRITES, write_host_pages

    monkeypatch.setattr(transfer, "HOST_WRITE_KERNEL", True)  # the kernel path (off by default)

    gen = torch.Generator().manual_seed(5)
    n_layers, cap, hkv, bs, d = 5, 7, 2, 4, 8
    pool = HostPool(20, (n_layers, hkv, bs, d), torch.float32, pin=device == "cuda")
    _, host = pool.take(cap)
    host.copy_(torch.randn(host.shape, generator=gen))
    x = torch.randn(3, 4, hkv, bs, d, generator=gen)  # layers 1..3, pages 2..5
    ref = host.clone()
    for j in range(3):
        ref[1 + j, 2:6] = x[j]
    fallbacks = HOST_WRITES["fallbacks"]
    write_host_pages(host, 1, 2, x.to(device), pin=device == "cuda")
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(host, ref)
    assert HOST_WRITES["fallbacks"] == fallbacks  # on CUDA: the in-place kernel wrote them
