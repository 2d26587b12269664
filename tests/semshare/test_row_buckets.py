"""Row buckets (`blend.row_bucket`): the rows recomputed past the boundary are padded with the
next most deviating matched rows, so requests with different row counts in one bucket run
the same matmul shapes (cuBLAS picks an algorithm per new shape: ~3 ms of host time each on
an H200), the padded blend still equals full recomputation where it recomputes, and
`warm_up` visits every bucket. Also: a recorded reference enters the store at `flush`."""

import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moska.attention.kv_cache import PagedKVCache
from moska.kernel_ops import kernel_ops
from moska.model import load_model
from moska.model.default import default_model_dir
from moska.semshare.blend import blend_prefill, extend, row_bucket
from moska.semshare.config import SemShareConfig
from moska.semshare.lsh import _unique
from moska.semshare.matching import match_tokens
from moska.semshare.reuse import SemanticReuse, row_buckets
from moska.semshare.store import prompt_key

BS = 16
_MM = {"mm", "addmm", "bmm"}  # and linear


class MatmulShapes(TorchDispatchMode):
    """The (M, K, N) of every matmul dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "linear":  # x [.., K] @ weight [N, K].T (not decomposed on the CPU)
            x, w = args[0], args[1]
            self.shapes.add((x.numel() // x.shape[-1], x.shape[-1], w.shape[0]))
        elif name in _MM:
            a, b = args[-2], args[-1]
            self.shapes.add((*a.shape[-2:], b.shape[-1]))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_dir(), dtype="float32", device="cpu").model


def _cache(model):
    c = model.config
    return PagedKVCache(c.num_kv_layers, 16, BS, c.num_kv_heads, c.head_dim, torch.float32, "cpu")


@pytest.fixture(scope="module")
def setup(model):
    gen = torch.Generator().manual_seed(5)
    ref_ids = torch.randint(0, 256, (120,), generator=gen)
    cache = _cache(model)
    extend(model, cache, list(range(16)), ref_ids, 0)
    reuse = SemanticReuse(SemShareConfig(), model, cache)
    return reuse, reuse.reference("ref", ref_ids, list(range(16))), ref_ids


def _blend(model, reuse, ref, ids, fraction, granule):
    """(BlendResult, matmul shapes whose M is not the prompt's n: the rows past the boundary)."""
    ref_pos = match_tokens(reuse.features(ids), ref.features, 0.9).ref_pos[:-1]
    cache = _cache(model)
    with MatmulShapes() as mode:
        res = blend_prefill(
            model, cache, list(range(16)), ids[:-1], 0, ref, ref_pos, fraction, 1, granule=granule
        )
    n = ids.shape[0] - 1
    return res, {s for s in mode.shapes if s[0] != n}, cache


def test_row_bucket_bounds():
    for g in (16, 64):
        for r in range(1, 3000, 7):
            b = row_bucket(r, 10**6, g)
            assert r <= b <= r + max(g, r // 16) and b % g == 0
            assert b in row_buckets(4096, g)
    assert row_bucket(50, 40, 64) == 40 and row_bucket(37, 100, 1) == 37


def test_bucketed_requests_share_matmul_shapes(model, setup):
    reuse, ref, ref_ids = setup
    a = ref_ids.clone()
    a[[10, 50]] = (a[[10, 50]] + 1) % 256
    b = ref_ids[:-8].clone()  # another length, more edits
    b[[5, 30, 60, 90]] = (b[[5, 30, 60, 90]] + 1) % 256
    ra, sa, _ = _blend(model, reuse, ref, a, 0.1, 1)
    rb, sb, _ = _blend(model, reuse, ref, b, 0.1, 1)
    assert ra.num_recomputed != rb.num_recomputed and sa != sb  # unbucketed: new shapes
    ra, sa, _ = _blend(model, reuse, ref, a, 0.1, 32)
    rb, sb, _ = _blend(model, reuse, ref, b, 0.1, 32)
    assert ra.num_recomputed == rb.num_recomputed == 32 and sa == sb and sa


def test_padded_rows_are_recomputed_exactly(model, setup):
    reuse, ref, ref_ids = setup
    ids = ref_ids.clone()
    ids[[10, 50]] = (ids[[10, 50]] + 1) % 256
    plain, _, _ = _blend(model, reuse, ref, ids, 0.1, 1)
    padded, _, _ = _blend(model, reuse, ref, ids, 0.1, 32)
    assert padded.num_recomputed == 32 > plain.num_recomputed
    assert padded.num_reused == plain.num_reused - (32 - plain.num_recomputed)
    # every row recomputed: the padding rows too, so fraction 1 must equal granule n
    full, _, _ = _blend(model, reuse, ref, ids, 1.0, 1)
    whole, _, c2 = _blend(model, reuse, ref, ids, 0.0, 256)
    assert whole.num_recomputed == full.num_recomputed == ids.shape[0] - 1
    ref_cache = _cache(model)
    extend(model, ref_cache, list(range(16)), ids[:-1], 0)
    err = (c2.k - ref_cache.k).norm() / ref_cache.k.norm()
    assert err < 1e-4


def test_warm_up_visits_every_bucket(model):
    reuse = SemanticReuse(SemShareConfig(row_granule=32), model, _cache(model))
    assert reuse.granule == 1 and reuse.warm_up(256) == 0  # CPU: bucketing off
    reuse.granule = 32
    with MatmulShapes() as mode:
        assert reuse.warm_up(256) == len(row_buckets(256, 32)) == 8
    assert {s[0] for s in mode.shapes} == set(row_buckets(256, 32))


def test_recorded_reference_enters_store_at_flush(model, setup):
    reuse, _, ref_ids = setup
    fresh = SemanticReuse(SemShareConfig(), model, reuse.cache)
    ref = fresh.reference(prompt_key(ref_ids), ref_ids, list(range(16)))
    sigs, done = fresh.store.lsh.signatures_async(ref.features)
    assert done is None  # CPU: already on the host
    fresh._pending.append((ref, sigs, done))
    assert len(fresh.store) == 0
    plan = fresh.plan(ref_ids.tolist())  # flushes first: the reference takes part
    assert len(fresh.store) == 1 and not fresh._pending
    assert plan is not None and plan.num_matched == ref_ids.shape[0]


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
    reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0)",
)
def test_cuda_bucketed_blend_after_warm_up():
    """On a GPU: bucketing is on, `warm_up` visits the buckets, a blend recomputes a whole
    bucket of rows with the CPU's bucketed counts, and a reference recorded by the engine
    hook's path (signatures copied without a wait) enters the store at the next plan."""
    gen = torch.Generator().manual_seed(8)
    ref_ids = torch.randint(0, 256, (300,), generator=gen)
    ids = ref_ids.clone()
    ids[[30, 150, 250]] = (ids[[30, 150, 250]] + 1) % 256
    counts = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.float16)):
        model = load_model(default_model_dir(), dtype=dtype, device=device).model
        model.kernels = kernel_ops("auto", device)
        c = model.config
        cache = PagedKVCache(c.num_kv_layers, 40, BS, c.num_kv_heads, c.head_dim, dtype, device)
        extend(model, cache, list(range(20)), ref_ids, 0)
        reuse = SemanticReuse(SemShareConfig(), model, cache)
        if device == "cuda":
            assert reuse.granule == 64 and reuse.warm_up(512) == len(row_buckets(512, 64))
        ref = reuse.reference(prompt_key(ref_ids), ref_ids, list(range(20)))
        reuse._pending.append((ref, *reuse.store.lsh.signatures_async(ref.features)))
        plan = reuse.plan(ids.tolist())
        assert plan is not None and len(reuse.store) == 1
        pos = plan.ref_pos.cpu()
        res = blend_prefill(
            model, cache, list(range(20, 40)), ids[:-1], 0, ref, pos[:-1], 0.0, 1, granule=64
        )
        counts[device] = (res, pos)
    (res_c, pos_c), (res_g, pos_g) = counts.values()
    assert res_g.num_recomputed == 64
    if (pos_c == pos_g).all():  # fp16 cosines may differ on a borderline tie
        assert res_c == res_g


def test_sorted_unique_equals_numpy():
    gen = np.random.default_rng(3)
    for a in (np.zeros(0, np.int64), gen.integers(0, 50, (300, 8)), gen.integers(0, 2**40, 4000)):
        assert np.array_equal(_unique(a), np.unique(a))


def test_bucketed_matching_equals_unbucketed():
    gen = torch.Generator().manual_seed(4)
    ref = torch.nn.functional.normalize(torch.randn(133, 48, generator=gen), dim=-1)
    shapes = []
    for n in (77, 90):
        new = ref[torch.randint(0, 133, (n,), generator=gen)]
        new = torch.nn.functional.normalize(new + 0.07 * torch.randn(n, 48, generator=gen), dim=-1)
        plain = match_tokens(new, ref, 0.9)
        with MatmulShapes() as mode:
            padded = match_tokens(new, ref, 0.9, granule=64)
        assert torch.equal(plain.ref_pos, padded.ref_pos) and 0 < plain.num_matched < n
        assert torch.allclose(plain.similarity, padded.similarity, rtol=1e-5, atol=1e-6)
        shapes.append(mode.shapes)
    assert shapes[0] == shapes[1] == {(128, 48, 192)}
