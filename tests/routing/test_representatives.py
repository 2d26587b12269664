"""Representative-key routing (moska/routing/representatives.py): the builders against plain
loops, the key-max kernel scoring [C * m, Hkv, r] representatives as if they were keys
(Triton interpreter) against the loop reference, and the chosen chunks."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from types import SimpleNamespace

import pytest
import torch

from moska.kernels.router import build_routing_index
from moska.routing import RoutingPolicy
from moska.routing.representatives import (
    RepSpec,
    build_representatives,
    representatives_for,
    route_representatives,
    score_representatives_ref,
    select_with_representatives,
)

LENS = [40, 64, 7, 33]  # a chunk shorter than m, a page split with a remainder


def index_of(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    offs = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32)
    k = (2 * torch.randn(int(offs[-1]), 2, 16, generator=gen)).to(dtype)
    return build_routing_index(k, offs, rank=8)


def loop_reps(lk, offs, spec):
    """Per chunk and KV head, the representatives as sets of rows (norm, page) by loops."""
    out = []
    for c in range(len(offs) - 1):
        keys = lk[offs[c] : offs[c + 1]].float()  # [L, Hkv, r]
        L = keys.shape[0]
        m = min(spec.m, max(LENS))
        per_head = []
        for h in range(keys.shape[1]):
            norms = keys[:, h].norm(dim=-1)
            if spec.kind == "norm":
                ids = norms.argsort(descending=True)[:m].tolist()
            else:
                page = -(-max(LENS) // m)
                ids = [int(norms[s : s + page].argmax()) + s for s in range(0, L, page)]
            per_head.append(keys[sorted(set(ids)), h])
        out.append(per_head)
    return out


@pytest.mark.parametrize("kind", ["norm", "page"])
@pytest.mark.parametrize("m", [4, 16])
def test_builders_pick_the_loop_reference_keys(kind, m):
    index = index_of()
    spec = RepSpec(kind, m)
    keys, offs = build_representatives(index.lowrank_keys, index.chunk_offsets, spec)
    assert offs.tolist() == [i * m for i in range(len(LENS) + 1)]
    ref = loop_reps(index.lowrank_keys, index.chunk_offsets.tolist(), spec)
    for c in range(len(LENS)):
        for h in range(2):
            got = keys[c * m : (c + 1) * m, h]
            want = ref[c][h]
            # the same set of keys (a short chunk repeats one of its own keys)
            assert torch.equal(torch.unique(got, dim=0), torch.unique(want, dim=0))


def test_kmeans_centroids_are_lloyd_on_each_chunk():
    index = index_of(seed=3)
    spec = RepSpec("kmeans", 4, iters=3)
    keys, _ = build_representatives(index.lowrank_keys, index.chunk_offsets, spec)
    init, _ = build_representatives(index.lowrank_keys, index.chunk_offsets, RepSpec("norm", 4))
    offs = index.chunk_offsets.tolist()
    c, h = 1, 1
    x = index.lowrank_keys[offs[c] : offs[c + 1], h].float()
    cent = init[4:8, h].float().clone()
    for _ in range(3):
        assign = torch.cdist(x, cent).argmin(dim=1)
        for j in range(4):
            if (assign == j).any():
                cent[j] = x[assign == j].mean(dim=0)
    torch.testing.assert_close(keys[4:8, h].float(), cent, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "tol", "kind"), [(torch.float32, 1e-4, "norm"), (torch.float16, 1e-2, "kmeans")]
)
def test_kernel_scores_representatives_like_the_reference(dtype, tol, kind):
    index = index_of(dtype, seed=1)
    spec = RepSpec(kind, 8)
    q = (2 * torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(2))).to(dtype)
    ref = score_representatives_ref(q, index, spec)
    from moska.kernels.router_dense import keymax_dense_scores

    reps = representatives_for(index, spec)
    assert representatives_for(index, spec) is reps  # cached
    got = keymax_dense_scores(q, reps.basis, reps.lowrank_keys, reps.chunk_offsets, block_n=16)
    assert ((got - ref).norm() / ref.norm()).item() < tol
    # a subset of the keys never scores above key-max over every key
    if kind == "norm":
        full = score_representatives_ref(q, index, RepSpec("norm", max(LENS)))
        assert (ref <= full + 1e-3).all() and (ref < full).any()


def test_selection_is_the_top_k_of_the_reference_scores():
    index = index_of(seed=4)
    lib = SimpleNamespace(routing=[index], num_chunks=len(LENS), mode="prefix")
    spec = RepSpec("norm", 8)
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(5))
    sel = select_with_representatives(q, lib, 0, 2, RoutingPolicy(), spec, use_triton=True)
    want = score_representatives_ref(q, index, spec).topk(2, dim=-1).indices.sort(-1).values
    got = [[[] for _ in range(2)] for _ in range(3)]
    for b, h, c in zip(sel.req.tolist(), sel.kv_head.tolist(), sel.chunk.tolist()):
        got[b][h].append(c)
    assert torch.equal(torch.tensor([[sorted(x) for x in r] for r in got]), want)
    # always-read chunks count toward k; every row reads chunk 3 (the nearest)
    sel = route_representatives(q, representatives_for(index, spec), 2, always=[3])
    assert set(sel.chunk[sel.chunk == 3].tolist()) == {3}
    assert (sel.chunk == 3).sum().item() == 3 * 2


def test_spec_is_checked():
    with pytest.raises(ValueError, match="kind"):
        RepSpec("centroid", 8)
    with pytest.raises(ValueError, match="m >= 1"):
        RepSpec("norm", 0)
