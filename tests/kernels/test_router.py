"""Router: scoring kernels vs references, routing invariants, and the needle test."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from moska.kernels.router import (
    SCORERS,
    build_routing_index,
    route,
    score_chunks,
    selections_to_lists,
    to_lowrank_dtype,
)
from moska.kernels.router_ref import bound_scores_ref, keymax_scores_ref, mean_scores_ref
from moska.kernels.router_scores import keymax_pair_scores

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def ragged_offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def make_index(C: int, Hkv: int, D: int, dtype, seed: int, rank=None):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (C,), generator=gen).tolist()
    lengths[0] = 1  # a one-key chunk
    offsets = ragged_offsets(lengths)
    k_pool = torch.randn(int(offsets[-1]), Hkv, D, generator=gen).to(dtype)
    return k_pool, offsets, build_routing_index(k_pool, offsets, rank)


def check_sorted_unique(sel, B: int, Hkv: int) -> None:
    assert all(t.dtype == torch.int32 for t in sel[:3])
    key = (sel.chunk.long() * Hkv + sel.kv_head.long()) * B + sel.req.long()
    assert bool((key[1:] > key[:-1]).all()), "selections must be sorted by (chunk, head, req)"


# G: query heads per KV head, one and an odd group. The key-max kernel (the interpreter's
# cost) runs two of the four (G, dtype) points; test_keymax_work_list runs the other two.
SCORE_CASES = [
    (scorer, G, dtype)
    for scorer in ("mean", "bound", "keymax")
    for G in (1, 3)
    for dtype in DTYPES
    if scorer != "keymax" or (G == 1) == (dtype == torch.float16)
]


@pytest.mark.parametrize("scorer,G,dtype", SCORE_CASES)
def test_scores_match_reference(scorer, G, dtype):
    Hkv, D, B, C = 2, 32, 5, 19
    _, offsets, index = make_index(C, Hkv, D, dtype, seed=G)
    q = torch.randn(B, Hkv * G, D).to(dtype)
    got = score_chunks(q, index, scorer)
    assert got.shape == (B, Hkv, C) and got.dtype == torch.float32
    if scorer == "mean":
        want = mean_scores_ref(q, index.mean_keys)
    elif scorer == "bound":
        want = bound_scores_ref(q, index.key_min, index.key_max)
    else:
        want = keymax_scores_ref(q, index.basis, index.lowrank_keys, offsets)
    assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize(
    "dtype,G,block_b,max_programs,project_first",
    [
        # the (G, dtype) points test_scores_match_reference leaves to this test
        (torch.float32, 1, 16, None, False),
        (torch.float16, 3, 16, None, True),
        (torch.float32, 3, 32, None, True),
        (torch.float16, 3, 16, 5, False),  # 5 programs loop over all (tile, head) items
    ],
)
def test_keymax_work_list(dtype, G, block_b, max_programs, project_first):
    """Ragged work list: chunks with 0, 1 and more than BLOCK_B pairs; keys over many blocks;
    queries projected in every tile or once before the launch."""
    Hkv, D, R, B = 2, 32, 16, 40
    offsets = ragged_offsets([1, 70, 5, 33, 17, 2])
    S = int(offsets[-1])
    basis = torch.linalg.qr(torch.randn(Hkv, D, R))[0].to(dtype)
    lowrank = torch.randn(S, Hkv, R).to(dtype)
    q = torch.randn(B, Hkv * G, D).to(dtype)
    counts = [3, 0, B, 1, 20, 7]  # chunk 2 with 40 pairs needs several tiles of 16
    pair_chunk = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)]).int()
    pair_req = torch.cat([torch.randperm(B)[:n].sort().values for n in counts]).int()
    got = keymax_pair_scores(
        q,
        basis,
        lowrank,
        offsets,
        pair_req,
        pair_chunk,
        block_b=block_b,
        block_n=32,
        max_programs=max_programs,
        project_first=project_first,
    )
    want = keymax_scores_ref(q, basis, lowrank, offsets)  # [B, Hkv, C]
    want = want[pair_req.long(), :, pair_chunk.long()]  # [P, Hkv]
    assert got.shape == want.shape
    assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])  # pure torch: bf16 is fine on CPU
def test_build_routing_index(dtype):
    Hkv, D = 2, 16
    offsets = ragged_offsets([3, 1, 50, 9, 30])
    k_pool = torch.randn(int(offsets[-1]), Hkv, D).to(dtype)
    index = build_routing_index(k_pool, offsets, rank=4, block_rows=7, max_fit_rows=40)
    assert index.basis.shape == (Hkv, D, 4) and index.lowrank_keys.shape == (93, Hkv, 4)
    assert all(t.dtype == dtype for t in index[1:5]) and index.chunk_offsets.dtype == torch.int32
    # low-rank keys: fp16 for half pools (the key-max kernel accumulates them in fp16)
    assert index.lowrank_keys.dtype == (torch.float32 if dtype == torch.float32 else torch.float16)
    for c in range(5):
        keys = k_pool[offsets[c] : offsets[c + 1]].float()
        torch.testing.assert_close(index.mean_keys[c].float(), keys.mean(0), **_tol(dtype))
        assert torch.equal(index.key_min[c].float(), keys.amin(0))
        assert torch.equal(index.key_max[c].float(), keys.amax(0))
    basis = index.basis.float()
    eye = torch.eye(4).expand(Hkv, 4, 4)
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, eye, atol=TOL[dtype], rtol=0)
    projected = torch.einsum("shd,hdr->shr", k_pool.float(), basis)
    torch.testing.assert_close(index.lowrank_keys.float(), projected, **_tol(dtype))


def _tol(dtype):
    if dtype == torch.float32:
        return {"atol": 1e-5, "rtol": 1e-5}
    return {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float16 else {"atol": 2e-2, "rtol": 2e-2}


def test_lowrank_keys_cast_to_fp16_with_clamp():
    """An older library's bf16 low-rank keys load as fp16, clamped to fp16's finite range."""
    x = torch.tensor([1.5, -3.0e5, 7.0e4, 0.0]).to(torch.bfloat16)
    y = to_lowrank_dtype(x, torch.bfloat16)
    assert y.dtype == torch.float16 and bool(torch.isfinite(y).all())
    assert y.tolist() == [1.5, -65504.0, 65504.0, 0.0]
    assert to_lowrank_dtype(torch.randn(3), torch.float32).dtype == torch.float32
    done = torch.randn(4).half()
    assert to_lowrank_dtype(done, torch.bfloat16) is done  # nothing to convert on load


def test_pca_basis_captures_key_subspace():
    """Keys in a 4-dim subspace: the rank-4 basis spans it, so low-rank logits are exact."""
    Hkv, D = 2, 32
    sub = torch.linalg.qr(torch.randn(Hkv, D, 4))[0]
    k_pool = torch.einsum("hdr,shr->shd", sub, torch.randn(200, Hkv, 4))
    index = build_routing_index(k_pool, ragged_offsets([100, 100]), rank=4)
    q = torch.randn(3, Hkv, D)
    exact = torch.einsum("bhd,shd->bhs", q, k_pool).amax(-1)
    low = torch.einsum("bhd,hdr,shr->bhs", q, index.basis, index.lowrank_keys).amax(-1)
    torch.testing.assert_close(low, exact, atol=1e-4, rtol=1e-4)


# two_stage with heads summed: test_two_stage_ranks_the_bound_shortlist_by_keymax (exact lists)
@pytest.mark.parametrize(
    "scorer,per_kv_head",
    [(s, p) for s in SCORERS for p in (False, True) if (s, p) != ("two_stage", False)],
)
def test_route_top_k(scorer, per_kv_head):
    B, Hkv, G, D, C, k = 6, 2, 2, 32, 13, 3
    _, offsets, index = make_index(C, Hkv, D, torch.float32, seed=7)
    q = torch.randn(B, Hkv * G, D)
    sel = route(q, index, k, scorer=scorer, per_kv_head=per_kv_head)
    check_sorted_unique(sel, B, Hkv)
    assert sel.req.numel() == B * Hkv * k
    lists = selections_to_lists(sel, B, num_kv_heads=Hkv)
    if scorer == "two_stage":  # shortlist 12 of 13 chunks: compare on what it returns
        return
    ref = {
        "mean": lambda: mean_scores_ref(q, index.mean_keys),
        "bound": lambda: bound_scores_ref(q, index.key_min, index.key_max),
        "keymax": lambda: keymax_scores_ref(q, index.basis, index.lowrank_keys, offsets),
    }
    scores = ref[scorer]()  # [B, Hkv, C]
    if not per_kv_head:
        scores = scores.sum(1, keepdim=True).expand(B, Hkv, C)
    want = scores.topk(k, dim=-1).indices.sort(-1).values.tolist()
    assert lists == want
    if not per_kv_head:
        assert all(per_b[h] == per_b[0] for per_b in lists for h in range(Hkv))


@pytest.mark.parametrize("scorer", SCORERS)
def test_route_all_chunks(scorer):
    B, Hkv, C = 3, 2, 5
    _, _, index = make_index(C, Hkv, 16, torch.float32, seed=1)
    sel = route(torch.randn(B, Hkv, 16), index, top_k=C + 2, scorer=scorer)
    check_sorted_unique(sel, B, Hkv)
    assert sel.req.numel() == B * Hkv * C
    assert selections_to_lists(sel, B) == [list(range(C))] * B


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_route_always(per_kv_head):
    B, Hkv, G, D, C, k = 4, 2, 3, 16, 9, 3
    _, _, index = make_index(C, Hkv, D, torch.float16, seed=3)
    q = torch.randn(B, Hkv * G, D).half()
    sel = route(q, index, k, per_kv_head=per_kv_head, always=[8, 0])
    check_sorted_unique(sel, B, Hkv)
    for per_b in selections_to_lists(sel, B, num_kv_heads=Hkv):
        assert all(len(cs) == k and 0 in cs and 8 in cs for cs in per_b)
    mask = torch.zeros(B, C, dtype=torch.bool)
    mask[torch.arange(B), torch.arange(B) * 2] = True  # request b always gets chunk 2b
    sel = route(q, index, k, scorer="two_stage", per_kv_head=per_kv_head, always=mask)
    for b, per_b in enumerate(selections_to_lists(sel, B, num_kv_heads=Hkv)):
        assert all(len(cs) == k and 2 * b in cs for cs in per_b)
    with pytest.raises(ValueError):
        route(q, index, 1, always=[1, 2])


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_two_stage_equals_keymax_when_shortlist_covers_all(per_kv_head):
    B, Hkv, G, D, C = 5, 2, 4, 32, 11
    _, _, index = make_index(C, Hkv, D, torch.float32, seed=5)
    q = torch.randn(B, Hkv * G, D)
    a = route(q, index, 3, scorer="keymax", per_kv_head=per_kv_head)
    b = route(q, index, 3, scorer="two_stage", per_kv_head=per_kv_head, shortlist_factor=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_two_stage_ranks_the_bound_shortlist_by_keymax():
    B, Hkv, G, D, C, k, f = 4, 1, 2, 32, 24, 2, 3
    _, offsets, index = make_index(C, Hkv, D, torch.float32, seed=11)
    q = torch.randn(B, Hkv * G, D)
    sel = route(q, index, k, scorer="two_stage", shortlist_factor=f)
    check_sorted_unique(sel, B, Hkv)
    bound = bound_scores_ref(q, index.key_min, index.key_max).sum(1)  # [B, C]
    keymax = keymax_scores_ref(q, index.basis, index.lowrank_keys, offsets).sum(1)
    short = bound.topk(k * f, dim=-1).indices
    on_short = torch.full_like(keymax, float("-inf")).scatter(1, short, keymax.gather(1, short))
    want = on_short.topk(k, dim=-1).indices.sort(-1).values.tolist()
    assert selections_to_lists(sel, B) == want


def test_bad_input_raises():
    _, _, index = make_index(4, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError):
        route(torch.randn(2, 2, 16), index, 2, scorer="nope")
    with pytest.raises(ValueError):
        route(torch.randn(2, 2, 16).half(), index, 2)  # dtype differs from the index
    with pytest.raises(ValueError):
        route(torch.randn(2, 3, 16), index, 2)  # Hq not a multiple of Hkv
    with pytest.raises(ValueError):
        build_routing_index(torch.randn(10, 2, 16), torch.tensor([0, 5, 5, 10]))


def needle_trial(seed: int, dtype=torch.float16) -> dict[str, float]:
    """One needle haystack; returns the share of requests whose top-k keeps the needle chunk.

    Keys of every KV head lie in a random 24-dim subspace of D = 128 plus small noise, so the
    rank-32 (D // 4) PCA basis captures them. One token of chunk `needle` has, in every KV
    head, a key of typical norm pointing along the query of that head's first query head;
    every other key is random. top_k keeps 25% of the chunks, heads aggregated (sum).
    """
    gen = torch.Generator().manual_seed(seed)
    Hkv, G, D, sub_dim, C, B, top_k = 2, 2, 128, 24, 16, 4, 4
    lengths = torch.randint(24, 48, (C,), generator=gen).tolist()
    offsets = ragged_offsets(lengths)
    sub = torch.linalg.qr(torch.randn(Hkv, D, sub_dim, generator=gen))[0]  # [Hkv, D, sub]
    z = torch.randn(int(offsets[-1]), Hkv, sub_dim, generator=gen)
    noise = 0.05 * torch.randn(z.shape[0], Hkv, D, generator=gen)
    keys = torch.einsum("hdr,shr->shd", sub, z) + noise  # [S_total, Hkv, D]
    q = torch.randn(B, Hkv * G, D, generator=gen)
    needle = int(torch.randint(0, C, (1,), generator=gen))
    row = int(offsets[needle]) + int(torch.randint(0, lengths[needle], (1,), generator=gen))
    for h in range(Hkv):
        u = sub[h] @ torch.randn(sub_dim, generator=gen)
        u = u / u.norm()  # needle direction, inside head h's key subspace
        keys[row, h] = u * keys[:, h].norm(dim=-1).mean()
        q[:, h * G] = 3.0 * u + 0.3 * torch.randn(B, D, generator=gen)
    index = build_routing_index(keys.to(dtype), offsets)
    found = {}
    for scorer in ("keymax", "mean", "two_stage"):
        # the scorers' quality, on their references (the kernels equal them: tests above)
        sel = route(q.to(dtype), index, top_k, scorer=scorer, use_triton=False)
        found[scorer] = sum(needle in cs for cs in selections_to_lists(sel, B)) / B
    return found


def test_needle_keymax_finds_it_mean_does_not():
    trials = [needle_trial(seed) for seed in range(12)]
    rates = {s: sum(t[s] for t in trials) / len(trials) for s in trials[0]}
    print(f"needle chunk kept (top 25% of chunks, fp16): {rates}")
    assert rates["keymax"] >= 0.9
    assert rates["two_stage"] >= 0.9
    assert rates["mean"] < rates["keymax"] - 0.3
