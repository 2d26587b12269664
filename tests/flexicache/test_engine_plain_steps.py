"""The engine's FlexiCache steps between re-rankings are plain (`plain_lists.py`): requests
admitted at different steps re-rank together every r engine steps (not each at its own
phase, which made almost every step a ranking step), pages are fetched only at re-rankings
and hand-offs, and a plain step reuses the last step's lists (started pages appended) with
the same tokens and logprobs as lists rebuilt at every step (so does a deferred re-ranking
that reads the kept lists); replayed from a (fake, on the CPU) graph of the static lists, the
same again."""

from __future__ import annotations

import pytest
import torch

from moska import LLM, SamplingParams
from moska.flexicache import FlexiCacheConfig, offload_sync
from moska.flexicache.engine_graphs import PlainGraphs
from moska.flexicache.engine_hook import FlexiEngine
from moska.flexicache.engine_step import FlexiStep
from moska.flexicache.offload import host_row_offsets
from moska.flexicache.plain_lists import HeadLists

R = 3
CFG = FlexiCacheConfig(
    top_k_pages=2, recent_pages=1, sink_pages=1, threshold=0.0, rerank_interval=R
)


def _prompt(i: int) -> list[int]:
    return [(13 * i + 7 * j + j * j) % 240 + 3 for j in range(30 + 5 * i)]


def _run(llm, monkeypatch, graphs: bool = False, fake: bool = True):
    """Three requests admitted one, two and four steps apart (each at its own phase of r),
    decoded greedily; per engine step: (FlexiCache clock at its begin, layers ranked, pages
    fetched, a plain step)."""
    runner, bm = llm.engine.runner, llm.engine.block_manager
    bm.free_listeners.clear()
    eng = FlexiEngine(CFG, runner.mcfg.num_kv_layers, runner.num_kv_heads, 4, runner.device)
    eng.attach(bm, runner.cache)
    eng.min_saving, eng.extend_pages = 0, 8
    runner.flexi = eng
    runner.flexi_graphs = PlainGraphs(runner.model, runner.attention, runner.device, fake=fake)
    pg = runner.flexi_graphs
    if not graphs:
        runner.flexi_graphs = None
    bm.reset_prefix_cache()
    ranked = [0]
    rank = FlexiStep._rank

    def counted(self, *args, **kwargs):
        ranked[0] += 1
        return rank(self, *args, **kwargs)

    monkeypatch.setattr(FlexiStep, "_rank", counted)
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=1)
    engine, out, steps = llm.engine, {}, []
    try:
        for n in range(60):
            if n in (0, 1, 3):
                engine.add_request(f"p{n}", _prompt(n), params)
            if not engine.has_unfinished_requests():
                break
            clock, r0, f0, p0 = eng.clock, ranked[0], eng.fetched_pages, eng.plain_steps
            for o in engine.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0]
            steps.append((clock, ranked[0] - r0, eng.fetched_pages - f0, eng.plain_steps - p0))
    finally:
        runner.flexi_graphs = None
    toks = {k: list(v.token_ids) for k, v in out.items()}
    lps = {k: [lp.logprob for lp in v.logprobs] for k, v in out.items()}
    eng.graph_replays = pg.replays if graphs else 0  # type: ignore[attr-defined]
    return eng, steps, toks, lps


def test_requests_rerank_together_and_plain_steps_fetch_nothing(flexi_llm, monkeypatch):
    eng, steps, _, _ = _run(flexi_llm, monkeypatch)
    layers = flexi_llm.engine.runner.mcfg.num_kv_layers
    ranking = [s for s in steps if s[1]]
    assert ranking and all(s[0] % R == 0 and s[1] == layers for s in ranking), steps
    assert len(ranking) <= -(-eng.clock // R), steps  # one ranking step in r at most
    plain = [s for s in steps if s[3]]
    assert len(plain) >= 3, steps  # the others: ranking, hand-offs, a finished request
    assert all(s[1] == 0 and s[2] == 0 for s in plain), steps  # no ranking, no fetch
    assert eng.offloads == 3 and eng.fetched_pages > 0


def test_plain_steps_and_their_graphs_equal_lists_rebuilt_every_step(
    flexi_llm, monkeypatch, fake: bool = True
):
    _, _, toks, lps = _run(flexi_llm, monkeypatch)
    monkeypatch.setattr(offload_sync, "MAX_ENTRIES", 1)  # a sync per layer (`layer_chunks`)
    eng, _, g_toks, g_lps = _run(flexi_llm, monkeypatch, graphs=True, fake=fake)
    monkeypatch.undo()
    # plain steps and deferred re-rankings that read the kept lists (ranked after the
    # forward, `PlainStep.finish`) replay
    replays = eng.graph_replays  # type: ignore[attr-defined]
    assert eng.plain_steps > 0 and eng.rerank_reads_kept > 0
    assert replays == eng.plain_steps + eng.rerank_reads_kept
    monkeypatch.setattr(HeadLists, "advance", lambda *a, **k: None)  # rebuild at every step
    eng, _, ref_toks, ref_lps = _run(flexi_llm, monkeypatch)
    assert eng.plain_steps == 0 and len(ref_toks) == 3
    for got_t, got_l in ((toks, lps), (g_toks, g_lps)):
        assert got_t == ref_toks
        for k in ref_lps:
            assert got_l[k] == pytest.approx(ref_lps[k], abs=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_plain_step_cuda_graphs_equal_lists_rebuilt_every_step(monkeypatch):
    """On a GPU: plain steps replayed from real CUDA graphs, pages fetched from pinned host
    copies in place (several requests' in one gather, `offload.gather_hosts`)."""
    llm = LLM(
        None, device="cuda", dtype="float32", num_kv_blocks=64, block_size=4,
        flexicache="k=2,recent=1,sink=1,threshold=2,r=2",
    )  # fmt: skip
    test_plain_steps_and_their_graphs_equal_lists_rebuilt_every_step(llm, monkeypatch, fake=False)


def test_host_row_offsets_address_each_copys_rows():
    """`offload.gather_hosts` reads several requests' host copies by one kernel through row
    offsets from the lowest copy's address: here copies carved out of one buffer (so that
    the rows are reachable by indexing on the CPU), at uneven places and sizes."""
    L, hkv, bs, d = 3, 2, 4, 8
    row = bs * d
    big = torch.randn(400 * hkv * row)
    hosts, at = [], [37, 0, 150]  # in pages (of hkv rows), lowest not first
    for start, pages in zip(at, (9, 11, 5)):
        n = L * pages * hkv * row
        hosts.append(big[start * hkv * row : start * hkv * row + n].view(L, pages, hkv, bs, d))
    bad = big[1 : 1 + L * 4 * hkv * row].view(L, 4, hkv, bs, d)  # not a whole row apart
    assert host_row_offsets([hosts[0], bad], 1)[1] is None
    for layer in range(L):
        base, offsets = host_row_offsets(hosts, layer)
        assert base is hosts[1] and offsets is not None
        rows = big[base.data_ptr() // 4 - big.data_ptr() // 4 :].view(-1, row)
        for t, off in zip(hosts, offsets):
            src = torch.randint(0, t.shape[1] * hkv, (6,))
            assert torch.equal(rows[off + src], t[layer].reshape(-1, row)[src])
