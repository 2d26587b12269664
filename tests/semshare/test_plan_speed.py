"""The plan's host-time cuts change no match: the LSH shares from sorted queries equal the
plain binary search (`_share_in`), and a plan whose matching was queued on the shortlist's
most voted reference (`SemanticReuse.speculate`, on CUDA) equals one without, whether the
guess was right or wrong."""

import os

import numpy as np
import pytest
import torch

from moska.attention.kv_cache import PagedKVCache
from moska.kernel_ops import kernel_ops
from moska.model import load_model
from moska.model.default import default_model_dir
from moska.semshare import reuse as reuse_mod
from moska.semshare.blend import extend
from moska.semshare.config import SemShareConfig
from moska.semshare.lsh import SortedQueries, _share_in, _unique
from moska.semshare.reuse import SemanticReuse


@pytest.mark.parametrize("seed", range(4))
def test_sorted_queries_equal_share_in(seed):
    rng = np.random.default_rng(seed)
    for n, bands, span in ((1024, 8, 1 << 40), (300, 4, 50), (7, 3, 5), (1, 1, 3)):
        sigs = rng.integers(0, span, (n, bands), dtype=np.int64)
        queries = SortedQueries(sigs)
        planted = rng.choice(sigs.reshape(-1), size=max(1, sigs.size // 3))  # shared keys
        others = rng.integers(-span, 2 * span, rng.integers(1, 5000), dtype=np.int64)
        for keys in (planted, others, np.concatenate([planted, others]), sigs[:1, :1]):
            keys = _unique(keys)
            assert queries.share_in(keys) == _share_in(sigs, keys)
    assert SortedQueries(sigs).share_in(np.zeros(0, np.int64)) == 0.0


_CUDA = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
    reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0)",
)


@pytest.fixture(scope="module")
def planner():
    return _planner("cpu", torch.float32)


def _planner(device, dtype):
    """A reuse path with three stored references of the tiny model: an original and two
    that share parts of it (so the shortlist holds several)."""
    model = load_model(default_model_dir(), dtype=dtype, device=device).model
    model.kernels = kernel_ops("auto", device)
    c = model.config
    cache = PagedKVCache(c.num_kv_layers, 48, 16, c.num_kv_heads, c.head_dim, dtype, device)
    gen = torch.Generator().manual_seed(21)
    base = torch.randint(0, 256, (120,), generator=gen)
    refs = {
        "orig": base,
        "half": torch.cat([base[:60], torch.randint(0, 256, (60,), generator=gen)]),
        "tail": torch.cat([torch.randint(0, 256, (70,), generator=gen), base[70:]]),
    }
    reuse = SemanticReuse(SemShareConfig(), model, cache)
    assert reuse.speculate == (device == "cuda")
    for i, (key, ids) in enumerate(refs.items()):
        table = list(range(8 * i, 8 * i + 8))
        with torch.inference_mode():
            extend(model, cache, table, ids, 0)
        reuse.store.put(reuse.reference(key, ids, table))
    return reuse, base, gen


def _variants(base, gen):
    out = []
    for edits in (3, 20, 45):
        ids = base.clone()
        at = torch.randperm(120, generator=gen)[:edits]
        ids[at] = torch.randint(0, 256, (edits,), generator=gen)
        out.append(ids.tolist())
    out.append(base[60:].tolist() + base[:60].tolist())  # reordered halves
    return out


def _plan(reuse, ids, speculate):
    reuse.speculate = speculate
    try:
        return reuse.plan(ids)
    finally:
        reuse.speculate = False


def _same(a, b):
    assert (a is None) == (b is None)
    if a is not None:
        assert a.ref.key == b.ref.key and a.score == b.score
        assert torch.equal(a.ref_pos, b.ref_pos) and torch.equal(a.ids, b.ids)


def test_speculative_plan_equals_plain(planner, monkeypatch):
    reuse, base, gen = planner
    calls = []
    real = reuse_mod.match_tokens
    monkeypatch.setattr(reuse_mod, "match_tokens", lambda *a: calls.append(1) or real(*a))
    planned = []
    for ids in _variants(base, gen):
        calls.clear()
        plain = _plan(reuse, ids, False)
        plain_calls = len(calls)
        calls.clear()
        fast = _plan(reuse, ids, True)
        _same(fast, plain)
        assert len(calls) == max(1, plain_calls)  # the guess was the winner: matched once
        if fast is not None:
            planned.append(fast.ref.key)
            assert torch.equal(fast.ids, torch.tensor(ids))
    assert len(planned) >= 3, planned


def test_wrong_guess_is_matched_again(planner, monkeypatch):
    reuse, base, gen = planner
    ids = _variants(base, gen)[0]
    plain = _plan(reuse, ids, False)
    assert plain is not None and plain.ref.key == "orig"
    lsh = reuse.store.lsh
    real = lsh.candidates

    def wrong_guess(features, top=1, sample=1024, prefetch=None):
        if prefetch is not None:
            prefetch("half")  # another stored reference than the one that wins
        return real(features, top, sample)

    calls = []
    match = reuse_mod.match_tokens
    monkeypatch.setattr(lsh, "candidates", wrong_guess)
    monkeypatch.setattr(reuse_mod, "match_tokens", lambda *a: calls.append(a[1]) or match(*a))
    fast = _plan(reuse, ids, True)
    _same(fast, plain)
    assert len(calls) == 2 and calls[1] is plain.ref.features  # guessed, then the winner


@_CUDA
def test_cuda_speculative_plan_equals_plain():
    """On a GPU (where it is on by default) the guessed matching is the one used."""
    reuse, base, gen = _planner("cuda", torch.float16)
    planned = 0
    for ids in _variants(base, gen):
        plain = _plan(reuse, ids, False)
        fast = _plan(reuse, ids, True)
        _same(fast, plain)
        planned += fast is not None
    assert planned >= 2  # (3 of the 4 on the CPU; fp16 cosines may drop a borderline one)
