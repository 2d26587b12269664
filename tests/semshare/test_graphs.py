"""The blend's layers past the boundary through `BlendGraphs` (`moska/semshare/graphs.py`).

CPU: the graph-able function, run eagerly from the static buffers (stale junk from a longer
earlier request left in them), writes the same KV as the plain eager blend, for a whole
prompt and for a second chunk (start > 0). CUDA (`-m cuda`, compiled Triton): a replay of a
captured bucket writes the eager blend's KV, and the engine's warm-up captures every bucket."""

import os
import warnings

import pytest
import torch

from moska.attention.kv_cache import PagedKVCache
from moska.kernel_ops import kernel_ops
from moska.model import load_model
from moska.model.default import default_model_dir
from moska.semshare.blend import blend_prefill, extend
from moska.semshare.config import SemShareConfig
from moska.semshare.graphs import BlendGraphs
from moska.semshare.matching import match_tokens
from moska.semshare.reuse import SemanticReuse, row_buckets

BS, BLOCKS = 16, 40
_CUDA = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
    reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0)",
)


def _setup(device: str, dtype: torch.dtype):
    model = load_model(default_model_dir(), dtype=dtype, device=device).model
    model.kernels = kernel_ops("auto", device)
    gen = torch.Generator().manual_seed(14)
    ref_ids = torch.randint(0, 256, (150,), generator=gen)
    cache = _cache(model, dtype, device)
    with torch.inference_mode():
        extend(model, cache, list(range(10)), ref_ids, 0)
    reuse = SemanticReuse(SemShareConfig(), model, cache)
    ref = reuse.reference("ref", ref_ids, list(range(10)))
    ids = torch.cat([ref_ids[:60], torch.randint(0, 256, (7,), generator=gen), ref_ids[60:]])
    ids[[20, 90, 130]] = (ids[[20, 90, 130]] + 1) % 256
    ref_pos = match_tokens(reuse.features(ids), ref.features, 0.9).ref_pos.cpu()
    return model, reuse, ref, ids, ref_pos


def _cache(model, dtype, device):
    c = model.config
    return PagedKVCache(c.num_kv_layers, BLOCKS, BS, c.num_kv_heads, c.head_dim, dtype, device)


@pytest.fixture(scope="module")
def cpu(blend_cpu):
    return blend_cpu


def _blend(model, cache, ref, ids, ref_pos, start, granule, graphs=None):
    """Blend ids[:-1] into blocks 20..39 of `cache` (positions [0, start) plainly first)."""
    table = list(range(20, BLOCKS))
    n = ids.shape[0] - 1
    with torch.inference_mode():
        if start:
            extend(model, cache, table, ids[:start], 0)
        return blend_prefill(
            model, cache, table, ids[start:n], start, ref, ref_pos[start:n], 0.1, 1,
            granule=granule, graphs=graphs,
        )  # fmt: skip


def _kv(cache, n):
    slots = torch.arange(20 * BS, 20 * BS + n, device=cache.k.device)
    flat = (cache.k.shape[0], -1, *cache.k.shape[-2:])
    return cache.k.view(flat)[:, slots].double().cpu(), cache.v.view(flat)[:, slots].double().cpu()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("start", [0, 48])
def test_buffered_tail_equals_eager_blend(cpu, start):
    model, _, ref, ids, ref_pos = cpu
    n = ids.shape[0] - 1
    eager_cache = _cache(model, torch.float32, "cpu")
    want = _blend(model, eager_cache, ref, ids, ref_pos, start, 16)
    cache = _cache(model, torch.float32, "cpu")
    graphs = BlendGraphs(model, cache, 1, 256, row_buckets(256, 16), capture=False)
    gen = torch.Generator().manual_seed(3)  # a longer earlier request's leftovers
    graphs.x.normal_(generator=gen)
    graphs.residual.normal_(generator=gen)
    graphs.pos.copy_(torch.randint(0, 400, graphs.pos.shape, generator=gen))
    graphs.slots.copy_(torch.randint(0, BLOCKS * BS, graphs.slots.shape, generator=gen))
    got = _blend(model, cache, ref, ids, ref_pos, start, 16, graphs)
    assert got == want and 0 < got.num_reused and graphs.eager == 1 and graphs.replays == 0
    assert len(graphs) == 0  # capture=False: nothing captured
    for a, b in zip(_kv(cache, n), _kv(eager_cache, n), strict=True):
        assert _rel(a, b) < 1e-5


def test_another_cache_runs_its_tail_eagerly(cpu):
    """The buffers (and a capture) address the cache they were built on: a blend into another
    cache writes that cache, without them."""
    model, _, ref, ids, ref_pos = cpu
    n = ids.shape[0] - 1
    want_cache = _cache(model, torch.float32, "cpu")
    want = _blend(model, want_cache, ref, ids, ref_pos, 0, 16)
    graphs = BlendGraphs(
        model, _cache(model, torch.float32, "cpu"), 1, 256, row_buckets(256, 16), capture=False
    )
    other = _cache(model, torch.float32, "cpu")
    got = _blend(model, other, ref, ids, ref_pos, 0, 16, graphs)
    assert got == want and graphs.eager == 0 and graphs.replays == 0
    for a, b in zip(_kv(other, n), _kv(want_cache, n), strict=True):
        assert _rel(a, b) < 1e-5


def test_rows_past_the_buffers_run_eagerly(cpu):
    model, _, ref, ids, ref_pos = cpu
    cache = _cache(model, torch.float32, "cpu")
    graphs = BlendGraphs(model, cache, 1, 8, [8], capture=False)  # fewer rows than kept
    res = _blend(model, cache, ref, ids, ref_pos, 0, 16, graphs)
    assert res.num_recomputed > 8 and graphs.eager == 0
    with pytest.raises(ValueError, match="capture=False"):
        BlendGraphs(model, cache, 1, 8, [8], capture=True)


@_CUDA
def test_cuda_replay_equals_eager():
    model, _, ref, ids, ref_pos = _setup("cuda", torch.float16)
    n = ids.shape[0] - 1
    eager_cache = _cache(model, torch.float16, "cuda")
    want = _blend(model, eager_cache, ref, ids, ref_pos, 0, 16)
    cache = _cache(model, torch.float16, "cuda")
    graphs = BlendGraphs(model, cache, 1, 256, row_buckets(256, 16))
    with torch.inference_mode():
        assert graphs.warm_up() == len(row_buckets(256, 16))  # every bucket captured
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            got = _blend(model, cache, ref, ids, ref_pos, 0, 16, graphs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert sum("synchroniz" in str(w.message) for w in log) <= 2  # as the eager blend
    assert got == want and graphs.replays == 1 and graphs.eager == 0
    for a, b in zip(_kv(cache, n), _kv(eager_cache, n), strict=True):
        assert _rel(a, b) < 1e-2
    # a second request in the same cache (the engine's: allocated once): the replay reads
    # the new inputs, not the captured ones
    ids2 = ids.clone()
    ids2[[40, 100]] = (ids2[[40, 100]] + 3) % 256
    e2 = _cache(model, torch.float16, "cuda")
    want2 = _blend(model, e2, ref, ids2, ref_pos, 0, 16)
    got2 = _blend(model, cache, ref, ids2, ref_pos, 0, 16, graphs)
    assert got2 == want2 and graphs.replays == 2
    for a, b in zip(_kv(cache, n), _kv(e2, n), strict=True):
        assert _rel(a, b) < 1e-2
    # another cache: the graphs write the captured cache's addresses, so the blend runs its
    # tail eagerly into this one (measured on the H200: a replay left it unwritten)
    c3 = _cache(model, torch.float16, "cuda")
    got3 = _blend(model, c3, ref, ids2, ref_pos, 0, 16, graphs)
    assert got3 == want2 and graphs.replays == 2
    for a, b in zip(_kv(c3, n), _kv(e2, n), strict=True):
        assert _rel(a, b) < 1e-2


@_CUDA
def test_cuda_engine_captures_buckets():
    """The engine's warm-up (granule 64) captures every bucket; a blend at its granule replays."""
    model, reuse, ref, ids, ref_pos = _setup("cuda", torch.float16)
    buckets = row_buckets(256, reuse.granule)
    assert reuse.warm_up(256) == len(buckets) and reuse.graphs is not None
    assert len(reuse.graphs) == len(buckets) and reuse.graphs.eager == 0
    n = ids.shape[0] - 1
    eager_cache = _cache(model, torch.float16, "cuda")
    want = _blend(model, eager_cache, ref, ids, ref_pos, 0, reuse.granule)
    # into the engine's cache (the graphs' own), blocks 20.. (the warm-up wrote slot 0)
    got = _blend(model, reuse.cache, ref, ids, ref_pos, 0, reuse.granule, reuse.graphs)
    assert got == want and got.num_recomputed in buckets and reuse.graphs.replays == 1
    for a, b in zip(_kv(reuse.cache, n), _kv(eager_cache, n), strict=True):
        assert _rel(a, b) < 1e-2
