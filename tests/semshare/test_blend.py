"""The blended prefill against full recomputation on the built-in tiny model (fp32, CPU):
reusing an identical prompt's KV, and recomputing every token, both give the full
computation's KV and logits; partial reuse recomputes exactly the planned rows."""

import math

import pytest
import torch

from moska.attention.kv_cache import PagedKVCache
from moska.model import load_model
from moska.model.default import default_model_dir
from moska.semshare.blend import blend_prefill, extend
from moska.semshare.config import SemShareConfig
from moska.semshare.matching import match_tokens
from moska.semshare.reuse import SemanticReuse

BS = 16


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_dir(), dtype="float32", device="cpu").model


def _cache(model, num_blocks=16):
    c = model.config
    return PagedKVCache(
        c.num_kv_layers, num_blocks, BS, c.num_kv_heads, c.head_dim, torch.float32, "cpu"
    )


def _full(model, ids):
    """(cache, hidden of the last token) of a plain computation of `ids`."""
    cache = _cache(model)
    hidden = extend(model, cache, list(range(cache.num_blocks)), ids, 0)
    return cache, hidden[-1]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _used(cache, n):
    """[L, n, Hkv, D] k and v of positions 0..n-1 (table = 0, 1, 2, ...)."""
    flat = (cache.k.shape[0], -1, *cache.k.shape[-2:])
    return cache.k.view(flat)[:, :n], cache.v.view(flat)[:, :n]


def _reference(model, ids):
    cache, _ = _full(model, ids)
    reuse = SemanticReuse(SemShareConfig(), model, cache)
    return reuse, reuse.reference("ref", ids, list(range(cache.num_blocks)))


def _blend_then_last(model, ids, ref, ref_pos, fraction, layers):
    """Blend [0, n-1), compute the last token plainly: (cache, its hidden, BlendResult)."""
    cache = _cache(model)
    table = list(range(cache.num_blocks))
    n = ids.shape[0]
    res = blend_prefill(model, cache, table, ids[:-1], 0, ref, ref_pos[:-1], fraction, layers)
    hidden = extend(model, cache, table, ids[-1:], n - 1)
    return cache, hidden[-1], res


def test_identical_prompt_reuse_equals_full_computation(model):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (70,), generator=gen)
    reuse, ref = _reference(model, ids)
    plan_pos = match_tokens(reuse.features(ids), ref.features, 0.9).ref_pos
    assert torch.equal(plan_pos, torch.arange(70))  # every token finds itself
    full, want = _full(model, ids)
    cache, got, res = _blend_then_last(model, ids, ref, plan_pos, 0.0, 1)
    assert res.num_reused == 69 and res.num_recomputed == 0
    for a, b in zip(_used(cache, 70), _used(full, 70)):
        assert _rel(a, b) < 1e-4
    assert _rel(model.compute_logits(got[None]), model.compute_logits(want[None])) < 1e-4


def test_recompute_everything_equals_full_computation(model):
    gen = torch.Generator().manual_seed(1)
    ref_ids = torch.randint(0, 256, (60,), generator=gen)
    ids = torch.cat([ref_ids[:20], torch.randint(0, 256, (7,), generator=gen), ref_ids[20:]])
    reuse, ref = _reference(model, ref_ids)
    ref_pos = match_tokens(reuse.features(ids), ref.features, 0.6).ref_pos
    assert (ref_pos >= 0).sum() > 30  # most of the prompt matched, most shifted by 7
    full, want = _full(model, ids)
    cache, got, res = _blend_then_last(model, ids, ref, ref_pos, 1.0, 1)
    assert res.num_reused == 0 and res.num_recomputed == ids.shape[0] - 1
    for a, b in zip(_used(cache, ids.shape[0]), _used(full, ids.shape[0])):
        assert _rel(a, b) < 1e-4
    assert _rel(got, want) < 1e-4


@pytest.mark.parametrize("fraction", [0.0, 0.3])
def test_partial_reuse_recomputes_unmatched_and_most_deviating(model, fraction):
    gen = torch.Generator().manual_seed(2)
    ref_ids = torch.randint(0, 256, (60,), generator=gen)
    ids = ref_ids.clone()
    ids[[10, 25, 40]] = (ids[[10, 25, 40]] + 1) % 256  # three "renamed" tokens
    reuse, ref = _reference(model, ref_ids)
    ref_pos = match_tokens(reuse.features(ids), ref.features, 0.9).ref_pos[:-1]
    matched = int((ref_pos >= 0).sum())
    assert 0 < matched < 59 and (ref_pos[[10, 25, 40]] == -1).all()
    cache = _cache(model)
    res = blend_prefill(model, cache, list(range(16)), ids[:-1], 0, ref, ref_pos, fraction, 2)
    assert res.num_reused == matched - math.ceil(fraction * matched)
    assert res.num_recomputed == 59 - res.num_reused
    full, _ = _full(model, ids)
    k, _ = _used(cache, 59)
    k_full, _ = _used(full, 59)
    # the first two layers are fresh for every token; an unmatched token is exact at every
    # layer only up to what it attends to, but its first-layer KV is its own
    assert _rel(k[:2], k_full[:2]) < 1e-4
    assert _rel(k[:, 10], k_full[:, 10]) < 0.5  # recomputed over mostly reused context
