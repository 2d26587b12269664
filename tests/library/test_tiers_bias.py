"""Residency-biased routing (library/tier_bias.py) and the sync-free read of resident chunks
(`ChunkTiers.attend_resident`, `resident_mask`); the benchmark's remap of a trace."""

from __future__ import annotations

import numpy as np
import torch

from moska.bench.tier_biased import remap
from moska.kernel_ops import kernel_ops
from moska.kernels.selections import from_topk
from moska.kernels.shared_attention import grouped_shared_attention_ref
from moska.library.chunk_store import MemoryChunks
from moska.library.tier_bias import bias_to_resident, topk_biased
from moska.library.tiers import ChunkTiers, TierConfig


def test_bias_zero_is_plain_topk_and_inf_routes_among_resident_only():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 3, 10, generator=g)
    resident = torch.zeros(10, dtype=torch.bool)
    resident[[1, 4, 6, 7, 9]] = True
    assert torch.equal(topk_biased(scores, resident, 0.0, 3), scores.topk(3, dim=-1).indices)
    top = topk_biased(scores, resident, float("inf"), 3)
    assert bool(resident[top].all())
    # the order among resident chunks is the scores' order
    masked = scores.masked_fill(~resident, float("-inf"))
    assert torch.equal(top, masked.topk(3, dim=-1).indices)


def test_a_resident_chunk_within_eps_wins_and_one_outside_does_not():
    # chunk 0 (non-resident) leads chunk 1 (resident) by half a std of the row's scores
    base = torch.tensor([0.0, 0.0, -3.0, -2.0, -1.5, -1.0])
    std = float(base.std())
    scores = base.clone()
    scores[0] = 0.5 * std
    resident = torch.tensor([False, True, False, False, False, False])
    spread = float(scores.std())
    margin = (scores[0] - scores[1]) / spread  # in std units, as eps
    near = topk_biased(scores, resident, float(margin) * 1.01, 1)
    far = topk_biased(scores, resident, float(margin) * 0.99, 1)
    assert near.tolist() == [1] and far.tolist() == [0]
    always = scores.clone()
    always[3] = float("inf")  # an `always` chunk stays first
    assert topk_biased(always, resident, 2.0, 1).tolist() == [3]
    assert torch.equal(bias_to_resident(scores, resident, 0.0), scores)


def test_remap_moves_non_resident_chunks_to_distinct_resident_ones():
    rng = np.random.default_rng(0)
    resident = np.zeros(12, dtype=bool)
    resident[[0, 3, 5, 8, 11]] = True
    phys = np.stack([rng.choice(12, size=4, replace=False) for _ in range(50)])
    out = remap(phys, resident, 1.0, rng)
    assert resident[out].all()
    assert all(len(set(r.tolist())) == 4 for r in out)
    kept = resident[phys]
    assert np.array_equal(out[kept], phys[kept])  # resident choices stay
    assert np.array_equal(remap(phys, resident, 0.0, rng), phys)
    half = remap(phys, resident, 0.5, rng)
    moved = (half != phys).sum() / (~kept).sum()
    assert 0.3 < moved < 0.7


def test_remap_device_moves_non_resident_chunks_to_distinct_resident_ones():
    from moska.bench.tier_biased import remap_device

    gen = torch.Generator().manual_seed(0)
    resident = torch.zeros(12, dtype=torch.bool)
    resident[[0, 3, 5, 8, 11]] = True
    phys = torch.stack([torch.randperm(12, generator=gen)[:4] for _ in range(50)])
    out, moved = remap_device(phys, resident, 1.0, gen)
    assert resident[out].all() and all(len(set(r.tolist())) == 4 for r in out)
    for p_row, o_row in zip(phys.tolist(), out.tolist()):  # resident choices stay
        assert {c for c in p_row if resident[c]} <= set(o_row)
    kept = resident[phys]
    assert int(moved) == int((~kept).sum())
    same, none = remap_device(phys, resident, 0.0, gen)
    assert int(none) == 0 and torch.equal(same.sort(1).values, phys.sort(1).values)
    _, half = remap_device(phys, resident, 0.5, gen)
    assert 0.3 < int(half) / int((~kept).sum()) < 0.7


def test_attend_resident_equals_plain_attention_without_bookkeeping():
    g = torch.Generator().manual_seed(5)
    layers, hkv, grp, d, chunk, chunks = 2, 2, 2, 8, 8, 6
    offs = [i * chunk for i in range(chunks + 1)]
    ks = [torch.randn(offs[-1], hkv, d, generator=g) for _ in range(layers)]
    vs = [torch.randn(offs[-1], hkv, d, generator=g) for _ in range(layers)]
    cfg = TierConfig(gpu_budget="1", prefetch="none")
    tiers = ChunkTiers(offs, MemoryChunks(ks, vs), cfg, torch.device("cpu"), 3, 1)
    for layer in range(layers):
        tiers.prefetch(layer, [4, 1, 2])
        mask = tiers.resident_mask(layer)
        assert set(torch.nonzero(mask).flatten().tolist()) == tiers.resident(layer) == {1, 2, 4}
    q = torch.randn(4, hkv * grp, d, generator=g)
    scores = torch.randn(4, chunks, generator=g)
    top = topk_biased(scores, tiers.resident_mask(1), float("inf"), 2)
    sel = from_topk(top.unsqueeze(1), hkv, chunks, use_triton=False)
    before = tiers.stats.as_dict()
    o, lse = tiers.attend_resident(kernel_ops("torch"), 1, q, sel, d**-0.5)
    offsets = torch.tensor(offs, dtype=torch.int32)
    o_ref, lse_ref = grouped_shared_attention_ref(q, ks[1], vs[1], offsets, sel, d**-0.5)
    assert (o - o_ref).abs().max() / o_ref.abs().max() < 1e-4
    assert torch.allclose(lse, lse_ref, rtol=1e-4, atol=1e-4)
    assert tiers.stats.as_dict() == before
