"""FlexiCache's plain decode steps as a CUDA graph replays them (session 14, #21): the token
written and the head lists' lengths indexed by device tensors, checked against a plain-PyTorch
attention over each head's kept pages of the whole K/V history; a plain step run twice (the
graph's warm-up before its capture) leaves what one run leaves; the per-head kernel with many
splits over lists of very different lengths (the default on CUDA now) equals its reference."""

from __future__ import annotations

import pytest
import torch

from moska.flexicache import FlexiCacheConfig, policy
from moska.flexicache.store import FlexiKV
from moska.kernels.paged_heads import paged_decode_heads, paged_decode_heads_ref

L, B, H, G, D, BS = 2, 2, 2, 2, 16, 4


def _store(prompt: int, gen: torch.Generator):
    cfg = FlexiCacheConfig(top_k_pages=2, recent_pages=1, sink_pages=1, threshold=0.0,
                           rerank_interval=3)  # fmt: skip  # threshold 0: every head stable
    store = FlexiKV(
        cfg, num_layers=L, batch=B, num_kv_heads=H, head_dim=D, block_size=BS, max_pages=12,
        dtype=torch.float32, device="cpu", zero_copy=False,
    )  # fmt: skip
    hist_k = torch.randn(L, B, prompt, H, D, generator=gen)
    hist_v = torch.randn(L, B, prompt, H, D, generator=gen)
    for layer in range(L):
        for row in range(B):
            q_last = torch.randn(H * G, D, generator=gen)
            store.write_prompt(layer, row, hist_k[layer, row], hist_v[layer, row], q_last)
    store.finish_prompts()
    return store, hist_k, hist_v


def _reference(store, layer, q, hist_k, hist_v) -> torch.Tensor:
    """Attention of q [B, Hq, D] over each head's kept pages of the history [B, T, H, D]."""
    t = hist_k.shape[1]
    out = torch.zeros(B, H * G, D)
    for b in range(B):
        for h in range(H):
            pages = store.kept[layer, b, h].nonzero().flatten()
            tok = (pages[:, None] * BS + torch.arange(BS)).flatten()
            tok = tok[tok < t]
            s = q[b, h * G : (h + 1) * G] @ hist_k[b, tok, h].T * 0.3
            out[b, h * G : (h + 1) * G] = torch.softmax(s, -1) @ hist_v[b, tok, h]
    return out


def test_plain_steps_equal_attention_over_kept_pages():
    gen = torch.Generator().manual_seed(11)
    store, hist_k, hist_v = _store(29, gen)
    plain = 0
    for _ in range(12):  # re-rankings, a page start and end, plain steps
        store.begin_step()
        plain += store.plain_step()
        nk, nv = (
            torch.randn(L, B, 1, H, D, generator=gen),
            torch.randn(L, B, 1, H, D, generator=gen),
        )
        hist_k, hist_v = torch.cat([hist_k, nk], 2), torch.cat([hist_v, nv], 2)
        for layer in range(L):
            q = torch.randn(B, H * G, D, generator=gen)
            o = store.attend(
                layer, q, nk[layer, :, 0], nv[layer, :, 0], paged_decode_heads_ref, 0.3
            )
            ref = _reference(store, layer, q, hist_k[layer], hist_v[layer])
            assert float((o - ref).norm() / ref.norm()) < 1e-4
            # the head lists' lengths: as a rebuild from the kept pages gives them
            seq = torch.full((B,), store.length)
            _, lens = policy.head_lists(store.kept[layer], store.slot[layer], seq, BS)
            assert torch.equal(store.lens[layer], lens)
            # the newest page's mean key, from the tokens written so far
            p, s = (store.length - 1) // BS, (store.length - 1) % BS
            mean = hist_k[layer, :, p * BS : p * BS + s + 1].mean(1)  # [B, H, D]
            torch.testing.assert_close(store.kmean[layer, :, :, p], mean, rtol=1e-5, atol=1e-6)
    assert 4 <= plain < 12  # both kinds of steps ran


def test_plain_step_run_twice_leaves_what_one_run_leaves():
    """The graph's warm-up runs the captured step's work once more before its replay."""
    gen = torch.Generator().manual_seed(12)
    stores = [_store(29, torch.Generator().manual_seed(5))[0] for _ in range(2)]
    inputs = [[torch.randn(B, H * G, D, generator=gen), torch.randn(B, H, D, generator=gen),
               torch.randn(B, H, D, generator=gen)] for _ in range(L)]  # fmt: skip
    for store in stores:  # to a plain step
        while True:
            store.begin_step()
            if store.plain_step():
                break
            for layer in range(L):
                store.attend(layer, *inputs[layer], paged_decode_heads_ref, 0.3)
    outs = []
    for runs, store in zip((1, 2), stores):
        for _ in range(runs):
            o = [
                store.attend(layer, *inputs[layer], paged_decode_heads_ref, 0.3)
                for layer in range(L)
            ]
        outs.append(torch.stack(o))
    a, b = stores
    assert torch.equal(outs[0], outs[1])
    for name in ("lens", "kmean", "slot", "tables"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert all(torch.equal(x, y) for x, y in zip(a.pool_k + a.pool_v, b.pool_k + b.pool_v))


def test_deferred_write_backs_fill_the_host_copy_as_inline_ones():
    """A graph's page-filling step queues its pages' copies after the replay
    (`queue_write_backs`): the host copy ends as with the copies queued inside `attend`."""
    gen = torch.Generator().manual_seed(14)
    stores = [_store(29, torch.Generator().manual_seed(6))[0] for _ in range(2)]
    stores[1].defer_write_back = True
    for _ in range(13):  # pages filled at lengths 32, 36, 40
        ins = [[torch.randn(B, H * G, D, generator=gen), torch.randn(B, H, D, generator=gen),
                torch.randn(B, H, D, generator=gen)] for _ in range(L)]  # fmt: skip
        outs = []
        for store in stores:
            store.begin_step()
            outs.append([store.attend(i, *ins[i], paged_decode_heads_ref, 0.3) for i in range(L)])
        stores[1].queue_write_backs()
        assert all(torch.equal(x, y) for x, y in zip(*outs))
    assert stores[0].write_back.pages_written == stores[1].write_back.pages_written > 0
    for store in stores:
        store.write_back.flush()
    a, b = stores
    assert torch.equal(a.host_k, b.host_k) and torch.equal(a.host_v, b.host_v)
    assert a.write_back.pages_written == 3 * L * B * H


@pytest.mark.parametrize("spread", [False, True])
def test_deferred_rerank_ranks_with_the_steps_queries_and_fetches_what_it_keeps(spread):
    """`deferred_rerank`: each step reads its heads' kept pages (attention over the history's
    tokens of those pages); after a re-ranking step every layer's top-K is the K candidate
    pages of most estimated mass under the step's queries (mean keys of the history), and
    every kept full page in the pool holds the history's K/V. `rerank_spread`: the same
    for the step's slice of layers (layer 0 after steps 3, 6, 9; layer 1 after 1, 4, 7; none
    after 2, 5, 8), the other layers' top-K unchanged."""
    gen = torch.Generator().manual_seed(15)
    store, hist_k, hist_v = _store(37, gen)
    store.cfg = FlexiCacheConfig(top_k_pages=2, recent_pages=1, sink_pages=1, threshold=0.5,
                                 rerank_interval=3)  # fmt: skip
    store.deferred_rerank = True
    store.rerank_spread = spread
    checked = 0
    for _ in range(10):
        old_top = store.top.clone()
        store.begin_step()
        nk, nv = (
            torch.randn(L, B, 1, H, D, generator=gen),
            torch.randn(L, B, 1, H, D, generator=gen),
        )
        hist_k, hist_v = torch.cat([hist_k, nk], 2), torch.cat([hist_v, nv], 2)
        qs = torch.randn(L, B, H * G, D, generator=gen)
        for layer in range(L):
            o = store.attend(layer, qs[layer], nk[layer, :, 0], nv[layer, :, 0],
                             paged_decode_heads_ref, 0.3)  # fmt: skip
            ref = _reference(store, layer, qs[layer], hist_k[layer], hist_v[layer])
            assert float((o - ref).norm() / ref.norm()) < 1e-4
        store.finish_step()
        ranked = [lay for lay in range(L) if store.step and (spread or store.step % 3 == 0)]
        if spread:
            ranked = [lay for lay in ranked if lay == store.step % 3]
        for layer in set(range(L)) - set(ranked):
            assert store.step == 0 or torch.equal(store.top[layer], old_top[layer])
        checked += len(ranked)
        t = store.length
        n_full, n_pages = t // BS, -(-t // BS)
        for layer in ranked:
            keys = torch.nn.functional.pad(hist_k[layer], (0, 0, 0, 0, 0, n_pages * BS - t))
            count = (t - torch.arange(n_pages) * BS).clamp(max=BS)  # tokens per page
            mean = keys.view(B, n_pages, BS, H, D).sum(2) / count[None, :, None, None]
            q = qs[layer].view(B, H, G, D)
            s = torch.einsum("bhgd,bphd->bhgp", q, mean) * 0.3 + count.float().log()
            mass = torch.softmax(s, -1).sum(2)  # [B, H, P]
            n_cand = -(-t // BS) - 1  # pages before the recent one, after the sink
            for b in range(B):
                for h in range(H):
                    want = set((mass[b, h, 1:n_cand].topk(2).indices + 1).tolist())
                    assert set(store.top[layer, b, h].tolist()) == want
                    for p in store.kept[layer, b, h, :n_full].nonzero().flatten().tolist():
                        slot = store.slot[layer, b, h, p]
                        got = store.pool_k[layer][slot, :, 0]
                        torch.testing.assert_close(got, hist_k[layer, b, p * BS : (p + 1) * BS, h])
                        got = store.pool_v[layer][slot, :, 0]
                        torch.testing.assert_close(got, hist_v[layer, b, p * BS : (p + 1) * BS, h])
    assert checked == 6 and store.fetched_pages > 0


def test_deferred_page_starts_take_idle_slots_instead_of_growing_the_pool():
    """Deferred mode: a page start takes a dropped page's slot when no slot is free, so the
    pools (and a CUDA graph over them) stay put between re-rankings."""
    from types import SimpleNamespace

    from moska.bench import flexicache_speed as fs

    mc = SimpleNamespace(num_kv_layers=1, num_kv_heads=4, head_dim=16, sm_scale=0.25)
    cfg = FlexiCacheConfig(top_k_pages=4, recent_pages=2, threshold=2.0, rerank_interval=4)
    store = fs._flexi_store(cfg, mc, 4, 96, 40, 4, torch.float32, torch.device("cpu"), 0.75, 0,
                            0.375, None)  # fmt: skip
    store.deferred_rerank = True
    gen = torch.Generator().manual_seed(16)
    versions = []
    for _ in range(48):  # 12 page starts, 12 re-rankings
        store.begin_step()
        q, k, v = (torch.randn(4, n, 16, generator=gen) for n in (8, 4, 4))
        store.attend(0, q, k, v, paged_decode_heads_ref, 0.25)
        store.finish_step()
        versions.append(store.pool_version)
    assert store.evicted_pages > 0  # idle pages gave their slots
    assert versions[-1] - versions[8] <= 1


def test_many_splits_over_skewed_lists_match_reference():
    """One long list (an unstable head) among short ones, split 5 ways: short lists leave
    splits empty."""
    gen = torch.Generator().manual_seed(13)
    b, hkv, g, d, bs, n_pages = 2, 2, 2, 16, 4, 24
    k = torch.randn(n_pages, bs, 1, d, generator=gen)
    v = torch.randn(n_pages, bs, 1, d, generator=gen)
    q = torch.randn(b, hkv * g, d, generator=gen)
    tables = torch.stack([torch.randperm(n_pages, generator=gen)[:20] for _ in range(b * hkv)])
    tables = tables.view(b, hkv, 20).int().contiguous()
    lens = torch.tensor([[79, 6], [3, 9]], dtype=torch.int32)
    o, lse = paged_decode_heads(q, k, v, tables, lens, 0.25, num_splits=5, block_n=16)
    o_ref, lse_ref = paged_decode_heads_ref(q, k, v, tables, lens, 0.25)
    assert float((o - o_ref).norm() / o_ref.norm()) < 1e-4
    assert float((lse - lse_ref).norm() / lse_ref.norm()) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("deferred", [False, True, "spread"])
def test_graph_replayed_plain_steps_equal_eager_steps_on_cuda(deferred):
    """The speed bench's `--graph` (plain steps replayed, others eager, recaptures after pool
    changes; deferred: re-ranking steps replayed too) gives the tokens and store state of
    all-eager steps."""
    from moska.bench import flexicache_speed as fs
    from moska.bench.common import random_loaded_model
    from moska.bench.flexicache_graph import GraphSteps
    from moska.kernel_ops import kernel_ops

    tiny = {**fs.TINY, "hidden_size": 64, "head_dim": 16, "torch_dtype": "float32"}
    lm = random_loaded_model(tiny, torch.float32, "cuda")
    lm.model.kernels = ops = kernel_ops("triton", "cuda")
    mc, dev = lm.config, torch.device("cuda")
    cfg = FlexiCacheConfig(top_k_pages=2, recent_pages=1, threshold=2.0, rerank_interval=3)
    args = (mc, 3, 70, 12, 8, torch.float32, dev, 0.5, 0, -1.0, None)
    stores = [fs._flexi_store(cfg, *args) for _ in range(2)]
    for store in stores:
        store.deferred_rerank = bool(deferred)
        store.rerank_spread = deferred == "spread"
    attns = [fs._Flexi(st, ops, mc.sm_scale) for st in stores]
    tokens = torch.randint(0, 128, (3,), device="cuda")
    graph = GraphSteps(lm.model, attns[1], tokens)
    steps = [fs._stepper(lm.model, attns[0]), graph]
    out = [tokens, tokens]
    for _ in range(20):
        for i, (store, step) in enumerate(zip(stores, steps)):
            store.begin_step()
            out[i] = step(out[i])
        assert torch.equal(out[0], out[1])
    a, b = stores
    for name in ("lens", "slot", "tables"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.kmean, b.kmean)
    assert graph.replays >= (16 if deferred else 8) and graph.captures >= 1
    assert graph.eager == 1 if deferred else graph.eager >= 6  # deferred: only the first


@pytest.mark.parametrize("hold", [False, True])
def test_deferred_page_start_drops_pages_only_at_re_rankings(hold):
    """`hold_unranked`: a page start never drops a page (the one leaving the recent window
    stays until its layer is re-ranked), and a layer's re-ranking (spread: one layer per
    step) leaves exactly its top-K and windows; off, page starts drop pages."""
    from moska.flexicache import deferred

    gen = torch.Generator().manual_seed(17)
    store, _, _ = _store(37, gen)
    store.cfg = FlexiCacheConfig(top_k_pages=2, recent_pages=1, sink_pages=1, threshold=0.0,
                                 rerank_interval=4)  # fmt: skip
    store.deferred_rerank = store.rerank_spread = True
    store.hold_unranked = hold
    lost = ranked_checks = 0
    for _ in range(10):  # lengths 38..47: page starts after 40 and 44
        store.begin_step()
        for layer in range(L):
            q, k, v = (torch.randn(B, n, D, generator=gen) for n in (H * G, H, H))
            store.attend(layer, q, k, v, paged_decode_heads_ref, 0.3)
        before = store.kept.clone()
        ranked = set(deferred.spread_layers(store)) if store.step else set()
        starts = store.length % BS == 0
        store.finish_step()
        n_pages = torch.full((B,), -(-store.length // BS))
        for layer in range(L):
            dropped = bool((before[layer] & ~store.kept[layer]).any())
            if layer not in ranked:
                lost += dropped
                assert not (hold and dropped)
            elif not starts:  # re-ranked, no page start after it: top-K and windows only
                want = policy.keep_mask(store.top[layer], store.stable[layer],
                                        torch.ones(B, dtype=torch.bool), n_pages, 1, 12, 1)  # fmt: skip
                assert torch.equal(store.kept[layer], want)
                ranked_checks += 1
    assert ranked_checks >= 2
    assert (lost == 0) if hold else (lost > 0)
