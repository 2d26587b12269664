"""The default router's key-max loop with two key blocks per iteration (``unroll`` 2, session
17, #17 routing cost): the same scores as one block per iteration and as the plain-PyTorch
reference, and the same chosen chunks as the reference's top-k; the decode bench's
``default_next`` row runs the tile named in ``$MOSKA_NEXT_TILE``."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from moska.bench import decode_routers
from moska.kernels import router_dense
from moska.kernels.router import route
from moska.kernels.router_ref import keymax_scores_ref
from tests.routing.test_router_cost import chosen, make_index

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The reference's choice: torch.topk over each (request, KV head) row."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True).cpu()


def agree_with_reference(got: torch.Tensor, scores: torch.Tensor, ref: torch.Tensor, k: int):
    """Rows whose reference gap between the k-th and (k+1)-th score exceeds twice the
    kernel's largest score error must pick the reference's chunks exactly (within that
    error no ranking can flip); returns (share of such rows, share of all rows equal)."""
    err = (scores - ref).abs().max().item()
    top = ref.sort(dim=-1, descending=True).values
    clear = ((top[..., k - 1] - top[..., k]) > 2 * err).cpu()
    rows_equal = (got == top_k_mask(ref, k)).all(-1)
    assert bool(rows_equal[clear].all()), "a clear row picked other chunks than the reference"
    return clear.float().mean().item(), rows_equal.float().mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_two_blocks_per_iteration_match_the_reference(dtype, monkeypatch):
    """16-key blocks; chunks of 5 keys (no full block), 32 (one pair) and 53 (a pair, one
    block, a ragged tail): the scores of unroll 2 equal unroll 1's and the reference's, and
    the default policy under ``default_next`` picks the reference's top-k chunks."""
    Hkv, D, G, B, k = 2, 16, 2, 4, 1
    lengths = [5, 32, 53]
    index = make_index(lengths, Hkv, D, dtype, rank=8, seed=7)
    q = torch.randn(B, Hkv * G, D).to(dtype)
    args = (q, index.basis, index.lowrank_keys, index.chunk_offsets)
    one = router_dense.keymax_dense_scores(*args, block_n=16, unroll=1)
    two = router_dense.keymax_dense_scores(*args, block_n=16, unroll=2)
    ref = keymax_scores_ref(*args)
    assert ((two - one).abs().max() / one.abs().max()).item() < 1e-6
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert ((two - ref).abs().max() / ref.abs().max()).item() < tol
    monkeypatch.setenv(decode_routers.NEXT_TILE_ENV, "b16n16w4s2u2")
    with decode_routers.router_row("default_next"):
        assert router_dense.tile_for(B) == router_dense.DenseTile(16, 16, 4, 2, 2)
        sel = route(q, index, k, "keymax", per_kv_head=True)
    assert router_dense.tile_for(B).unroll == 1  # restored
    got = chosen(sel, B, Hkv, len(lengths))
    assert torch.equal(got, top_k_mask(two, k))  # its own scores' top-k
    clear, _ = agree_with_reference(got, two, ref, k)
    assert clear > 0.5  # most rows are far from a tie at these sizes


def test_tile_tags_and_bad_unroll():
    assert decode_routers.parse_tile("b32n128w4s4") == router_dense.DenseTile(32, 128, 4, 4, 1)
    assert decode_routers.parse_tile("b64n64w8s3u2") == router_dense.DenseTile(64, 64, 8, 3, 2)
    with pytest.raises(ValueError, match="bBnNwWsS"):
        decode_routers.parse_tile("b32n128u2")
    index = make_index([4, 4], 1, 16, torch.float32, rank=4)
    q = torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match="unroll"):
        router_dense.keymax_dense_scores(q, index.basis, index.lowrank_keys,
                                         index.chunk_offsets, unroll=3)  # fmt: skip


def test_zipf_rows_read_their_own_fixed_chunks():
    """``none`` and ``none_zipf`` each read their own fixed top-k (k distinct chunks per
    (request, KV head)); the Zipf draw puts more rows on its hottest chunk."""
    B, Hkv, C, k = 64, 2, 32, 4
    fixed = decode_routers.fixed_rows(["none", "none_zipf", "default"], B, Hkv, C, k, 1, "cpu")
    assert set(fixed) == {"none", "none_zipf"}
    hottest = {}
    for name, layers in fixed.items():
        sel = layers[0]
        mask = chosen(sel, B, Hkv, C)
        assert sel.req.numel() == B * Hkv * k and bool((mask.sum(-1) == k).all())
        hottest[name] = int(torch.bincount(sel.chunk.long(), minlength=C).max())
        with decode_routers.router_row(name, fixed):
            from moska.attention import shared

            assert shared.route_group(None, 0, None, None, 1.0) is sel
    assert hottest["none_zipf"] > hottest["none"]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA (TRITON_INTERPRET=0 pytest -m cuda)")
@pytest.mark.parametrize("tile", ["b32n128w4s4u2", "b32n64w4s4u2", "b16n256w4s3"])
def test_candidate_tiles_cuda_8b_dims(tile, monkeypatch):
    """8B dims, bf16 pool, fp16 low-rank keys, 4,096-key chunks, B not a multiple of the
    tile: each candidate tile's scores equal the current tile's (the log says whether
    bitwise), its chunks equal the current tile's exactly, and agree with the fp32
    reference's top-k except where fp16 logits round a near-tie (share printed)."""
    Hkv, D, G, B, C, k = 8, 128, 4, 200, 24, 3
    index = make_index([4096] * C, Hkv, D, torch.bfloat16, 32, "cuda")
    q = torch.randn(B, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
    args = (q, index.basis, index.lowrank_keys, index.chunk_offsets)
    now = router_dense.keymax_dense_scores(*args)
    cand = router_dense.keymax_dense_scores(*args, **decode_routers.parse_tile(tile)._asdict())
    ref = keymax_scores_ref(*args)
    assert ((cand - ref).abs().max() / ref.abs().max()).item() < 1e-2
    assert ((cand - now).abs().max() / now.abs().max()).item() < 1e-3
    sel_now = route(q, index, k, "keymax", per_kv_head=True)
    monkeypatch.setenv(decode_routers.NEXT_TILE_ENV, tile)
    with decode_routers.router_row("default_next"):
        sel = route(q, index, k, "keymax", per_kv_head=True)
    got = chosen(sel, B, Hkv, C)
    assert torch.equal(got, top_k_mask(cand, k))  # its own scores' top-k
    clear, agree = agree_with_reference(got, cand, ref, k)
    print(f"tile {tile}: scores bitwise equal to the current tile: {torch.equal(cand, now)}; "
          f"chunks equal the current tile's: {torch.equal(got, chosen(sel_now, B, Hkv, C))}; "
          f"rows equal to the fp32 reference's top-k: {agree:.4f} (rows beyond the "
          f"scores' error from a tie: {clear:.4f}, all equal)")  # fmt: skip
