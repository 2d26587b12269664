"""The default router's cost work (session 16, #17.3 / #22.5): the key-max tile chosen now
picks the same chunks as the tile before; the per-KV-head shortlist (a study knob) against
a plain-PyTorch reference; the decode bench's router rows (decode_routers.py)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from moska.bench import decode_routers
from moska.kernels import router_dense
from moska.kernels.router import build_routing_index, route, score_chunks
from moska.kernels.router_ref import bound_scores_ref, keymax_scores_ref
from moska.kernels.router_scores import keymax_pair_scores
from moska.kernels.selections import from_topk
from moska.routing import RoutingPolicy, select_chunks

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"


def make_index(lengths, Hkv, D, dtype, rank, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    k = torch.randn(int(offsets[-1]), Hkv, D, generator=gen).to(device, dtype)
    return build_routing_index(k, offsets.to(device), rank)


def chosen(sel, B, Hkv, C) -> torch.Tensor:
    mask = torch.zeros(B, Hkv, C, dtype=torch.bool, device=sel.req.device)
    mask[sel.req.long(), sel.kv_head.long(), sel.chunk.long()] = True
    return mask.cpu()


def test_new_tile_picks_the_chunks_of_the_old_tile():
    """Chunks longer than one 128-key block, one of them ragged: the scores of the tile
    chosen in session 16 equal the old tile's (the same products, an exact max), and the
    default policy picks the same chunks."""
    Hkv, D, G, B = 2, 16, 2, 3
    lengths = [130, 7, 70]
    index = make_index(lengths, Hkv, D, torch.float32, rank=8, seed=3)
    q = torch.randn(B, Hkv * G, D)
    args = (q, index.basis, index.lowrank_keys, index.chunk_offsets)
    new = router_dense.keymax_dense_scores(*args)
    old = router_dense.keymax_dense_scores(*args, **router_dense.OLD_TILE._asdict())
    assert router_dense.TILE != router_dense.OLD_TILE and router_dense.TILE.block_n == 128
    # the same products (the interpreter's matmul may sum a product in another order per
    # block shape: the last bits of fp32)
    assert ((new - old).abs().max() / old.abs().max()).item() < 1e-6
    ref = keymax_scores_ref(*args)
    assert ((new - ref).abs().max() / ref.abs().max()).item() < 1e-4
    sel_new = route(q, index, 2, "keymax", per_kv_head=True)
    with decode_routers.router_row("default_before"):
        assert router_dense.TILE == router_dense.OLD_TILE
        sel_old = route(q, index, 2, "keymax", per_kv_head=True)
    assert router_dense.TILE.block_n == 128  # restored
    assert all(torch.equal(a, b) for a, b in zip(sel_new, sel_old))


def test_per_head_pair_scores_match_reference():
    """(request, KV head, chunk) triples, each scored for its own head: as [P] rows and
    written into the score table (the rest -inf)."""
    Hkv, D, G, B, C = 2, 16, 3, 4, 3
    index = make_index([9, 17, 4], Hkv, D, torch.float32, rank=4, seed=1)
    q = torch.randn(B, Hkv * G, D)
    pick = torch.rand(B, Hkv, C, generator=torch.Generator().manual_seed(0)).topk(2, -1).indices
    sel = from_topk(pick, Hkv, C)  # sorted by (chunk, head, req)
    args = (q, index.basis, index.lowrank_keys, index.chunk_offsets, sel.req, sel.chunk)
    rows = keymax_pair_scores(*args, block_b=16, block_n=16, pair_head=sel.kv_head)
    ref = keymax_scores_ref(q, index.basis, index.lowrank_keys, index.chunk_offsets)
    want = ref[sel.req.long(), sel.kv_head.long(), sel.chunk.long()]
    assert rows.shape == (sel.req.numel(),)
    assert ((rows - want).abs().max() / want.abs().max()).item() < 1e-4
    table = torch.full((B, Hkv, C), float("-inf"))
    keymax_pair_scores(*args, block_b=16, block_n=16, pair_head=sel.kv_head, out=table)
    full = torch.full((B, Hkv, C), float("-inf"))
    full[sel.req.long(), sel.kv_head.long(), sel.chunk.long()] = rows
    assert torch.equal(table, full)


def shortlist_kv_ref(q, index, k, factor) -> torch.Tensor:
    """Each (request, KV head): its own bound's top factor * k chunks, ranked by key-max."""
    bound = bound_scores_ref(q, index.key_min, index.key_max)  # [B, Hkv, C]
    keymax = keymax_scores_ref(q, index.basis, index.lowrank_keys, index.chunk_offsets)
    short = bound.topk(min(bound.shape[-1], k * factor), dim=-1).indices
    on = torch.full_like(keymax, float("-inf")).scatter(-1, short, keymax.gather(-1, short))
    out = torch.zeros_like(keymax, dtype=torch.bool)
    return out.scatter(-1, on.topk(k, dim=-1).indices, True)


def test_shortlist_per_head_matches_reference():
    """A shortlist of 4 of 10 chunks per (request, KV head): heads shortlist differently."""
    Hkv, D, G, B, k, factor = 2, 16, 2, 5, 2, 2
    lengths = [5, 11, 3, 8, 13, 6, 9, 4, 7, 10]
    index = make_index(lengths, Hkv, D, torch.float32, rank=8, seed=4)
    q = torch.randn(B, Hkv * G, D)
    sel = route(q, index, k, "two_stage", per_kv_head=True, shortlist_factor=factor,
                shortlist_per_head=True)  # fmt: skip
    assert torch.equal(chosen(sel, B, Hkv, len(lengths)), shortlist_kv_ref(q, index, k, factor))


def test_policy_knob_reaches_the_router(monkeypatch):
    from moska.routing import select

    seen = {}
    monkeypatch.setattr(select, "route", lambda *a, **kw: seen.update(kw))

    class Lib:  # what select_chunks reads of a loaded library
        def __init__(self) -> None:
            self.routing = [make_index([3, 4, 5], 1, 16, torch.float32, rank=4)]
            self.num_chunks, self.mode = 3, "prefix"

    policy = decode_routers.policy_of("default_shortlist_kv")
    assert policy == RoutingPolicy(scorer="two_stage", shortlist_per_head=True)
    select_chunks(torch.randn(2, 2, 16), Lib(), 0, 1, policy, 0.25)
    assert seen["shortlist_per_head"] is True and seen["scorer"] == "two_stage"


def test_no_router_rows_read_their_fixed_chunks():
    """``none`` replaces routing by fixed uniform chunks per (request, KV head) and layer;
    the other names are policies; the floor counts no router for ``none``."""
    fixed = decode_routers.fixed_selections(3, 2, 6, 2, layers=2, device="cpu")
    assert len(fixed) == 2 and all(f.req.numel() == 3 * 2 * 2 for f in fixed)
    from moska.attention import shared

    with decode_routers.router_row("none", fixed):
        assert shared.route_group(None, 1, None, None, 1.0) is fixed[1]
    assert shared.route_group is not None and shared.route_group.__name__ == "route_group"
    assert decode_routers.floor_scorer("none") == "none"
    assert decode_routers.floor_scorer("default") == RoutingPolicy().scorer
    assert decode_routers.policy_of("two_stage_old").per_kv_head is False
    with pytest.raises(ValueError, match="unknown router"):
        decode_routers.policy_of("fastest")
    rows = [
        {"mode": "moska:none", "batch": 4, "step_ms": 2.0},
        {"mode": "moska:default", "batch": 4, "step_ms": 3.5, "router_alone_ms": 1.2},
    ]
    s = decode_routers.routers_summary(rows, [])
    assert s["default_cost_ms_b4"] == 1.5 and s["default_alone_ms_b4"] == 1.2


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA (TRITON_INTERPRET=0 pytest -m cuda)")
def test_tiles_and_shortlist_cuda_8b_dims():
    """8B dims (Hq 32, Hkv 8, D 128), bf16 pool, fp16 low-rank keys, 4,096-key chunks, B not
    a multiple of the tile: the new tile's chunks equal the old tile's (and its scores the
    reference's), and the per-head shortlist equals its reference."""
    Hkv, D, G, B, C, k = 8, 128, 4, 200, 24, 3
    index = make_index([4096] * C, Hkv, D, torch.bfloat16, 32, "cuda")
    q = torch.randn(B, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
    args = (q, index.basis, index.lowrank_keys, index.chunk_offsets)
    new = router_dense.keymax_dense_scores(*args)
    old = router_dense.keymax_dense_scores(*args, **router_dense.OLD_TILE._asdict())
    ref = keymax_scores_ref(*args)
    assert ((new - ref).abs().max() / ref.abs().max()).item() < 1e-2
    assert ((new - old).abs().max() / old.abs().max()).item() < 1e-3
    print("tile scores bitwise equal:", torch.equal(new, old))  # -s shows it in the log
    sel_new = route(q, index, k, "keymax", per_kv_head=True)
    with decode_routers.router_row("default_before"):
        sel_old = route(q, index, k, "keymax", per_kv_head=True)
    assert all(torch.equal(a, b) for a, b in zip(sel_new, sel_old))
    sel = route(q, index, k, "two_stage", per_kv_head=True, shortlist_per_head=True)
    got = chosen(sel, B, Hkv, C)
    # the reference on the kernels' own scores (ties of fp16 logits decide alike)
    bound = score_chunks(q, index, "bound")
    short = bound.topk(4 * k, dim=-1).indices
    on = torch.full_like(new, float("-inf")).scatter(-1, short, new.gather(-1, short))
    want = torch.zeros_like(new, dtype=torch.bool).scatter(-1, on.topk(k, -1).indices, True)
    agree = (got == want.cpu()).all(-1).float().mean().item()
    assert agree > 0.99, agree  # rows whose bound shortlist differs by a rounding tie
