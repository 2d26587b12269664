"""A hand-off in a full cache (`FlexiEngine._hand_off`): when too few blocks are free for
the request's page pool, the request's own blocks (released by the hand-off anyway) make
the room: released first, then the pool reserved. Before, the hand-off waited for free
blocks that a full cache never had, so the request kept its full KV (the equal-budget
bench admits requests up to the budget's edge)."""

from __future__ import annotations

from moska import SamplingParams
from moska.flexicache import FlexiCacheConfig
from moska.flexicache.engine_hook import FlexiEngine

CFG = FlexiCacheConfig(
    top_k_pages=2, recent_pages=1, sink_pages=1, threshold=0.0, rerank_interval=3, host_gib=0
)
PROMPT = [(5 * j + j * j) % 240 + 3 for j in range(40)]  # 10 pages of 4 tokens


def _run(llm, hog: int):
    """Greedy tokens and logprobs of one request with `hog` blocks held elsewhere."""
    runner, bm = llm.engine.runner, llm.engine.block_manager
    bm.free_listeners.clear()
    eng = FlexiEngine(CFG, runner.mcfg.num_kv_layers, runner.num_kv_heads, 4, runner.device)
    eng.attach(bm, runner.cache)
    eng.min_saving, eng.extend_pages = 0, 1
    runner.flexi = eng
    bm.reset_prefix_cache()
    held = bm.allocator.allocate(hog) if hog else []
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
        (out,) = llm.generate([PROMPT], params)
    finally:
        for b in held:
            bm.allocator.decref(b)
    return eng, list(out.outputs[0].token_ids), [lp.logprob for lp in out.outputs[0].logprobs]


def test_hand_off_in_a_full_cache_releases_first(flexi_llm):
    free, toks, lps = _run(flexi_llm, 0)
    assert free.offloads == 1 and free.released_first == 0
    total = flexi_llm.engine.block_manager.allocator.num_available
    # the prompt's 10 blocks and 2 to grow into: no room for a pool beside them
    tight, toks2, lps2 = _run(flexi_llm, total - 12)
    assert tight.offloads == 1 and tight.released_first == 1
    assert toks2 == toks
    assert max(abs(a - b) for a, b in zip(lps, lps2)) < 1e-5
    assert flexi_llm.engine.block_manager.allocator.num_used == 0


def test_hand_off_in_layer_chunks_equals_layer_by_layer(flexi_llm, monkeypatch):
    """`Offload.extend` moves the pages of several layers at once (`layer_chunk`): the same
    tokens and logprobs as one layer at a time (later hand-offs included: extend_pages = 1)."""
    from moska.flexicache import transfer

    n_layers = flexi_llm.engine.runner.cache.k.shape[0]
    assert transfer.layer_chunk(flexi_llm.engine.runner.cache.k, 8) == n_layers > 1
    eng, toks, lps = _run(flexi_llm, 0)
    monkeypatch.setattr(transfer, "MOVE_BYTES", 1)
    assert transfer.layer_chunk(flexi_llm.engine.runner.cache.k, 8) == 1
    eng1, toks1, lps1 = _run(flexi_llm, 0)
    assert eng.offloads == eng1.offloads == 1 and eng.extensions == eng1.extensions > 0
    assert toks1 == toks and max(abs(a - b) for a, b in zip(lps, lps1)) < 1e-6


def test_write_slots_layers_equals_write_slots_per_layer():
    """`write_slots_layers` (several layers of one [L, N, bs, Hkv, D] cache at once) writes
    what `write_slots` writes layer by layer, padded entries included (fresh random data)."""
    import torch

    from moska.flexicache.offload import write_slots, write_slots_layers

    gen = torch.Generator().manual_seed(3)
    n_l, n, bs, hkv, d, m = 3, 6, 4, 2, 8, 5
    cache = torch.randn(n_l, n, bs, hkv, d, generator=gen)
    dst = torch.stack([torch.randperm(n * hkv, generator=gen)[:m] for _ in range(n_l)])
    rows = torch.randn(n_l, m, bs * d, generator=gen)
    used = torch.rand(n_l, m, generator=gen) < 0.6
    used[1] = False  # a layer with nothing to write: its first slot keeps its content
    ref = cache.clone()
    for layer in range(n_l):
        write_slots(ref[layer], hkv, dst[layer], rows[layer], used[layer])
    got = cache.clone()
    write_slots_layers(got, slice(0, n_l), hkv, dst, rows, used)
    assert torch.equal(got, ref) and not torch.equal(got, cache)
    part = cache.clone()  # a chunk of the layers only
    write_slots_layers(part, slice(1, 3), hkv, dst[1:], rows[1:], used[1:])
    assert torch.equal(part[0], cache[0]) and torch.equal(part[1:], ref[1:])
