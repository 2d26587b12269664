"""The default router's one-launch key-max scores (router_dense.py) and the two-stage
router's in-kernel score table, against the plain-PyTorch reference; the routed-step floor
counts the router's own work."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from moska.bench.floors import router_cost
from moska.kernels.router import build_routing_index, route, score_chunks
from moska.kernels.router_dense import keymax_dense_scores, project_queries
from moska.kernels.router_ref import keymax_scores_ref
from moska.kernels.router_scores import keymax_pair_scores
from moska.kernels.router_tiles import pair_tiles

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def make_index(lengths, Hkv, D, dtype, rank, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    k = torch.randn(int(offsets[-1]), Hkv, D, generator=gen).to(device, dtype)
    return build_routing_index(k, offsets.to(device), rank)


@pytest.mark.parametrize(
    "dtype,G,B,max_programs,project_first",
    [(torch.float32, 3, 5, None, True), (torch.float16, 2, 3, 2, False)],
)
def test_dense_keymax_matches_reference(dtype, G, B, max_programs, project_first):
    """Ragged chunks (one of a single key, one past a 16-key block), B not a multiple of the
    tile, an odd GQA group; a capped grid loops over the tiles; queries projected once
    before the launch or in every tile."""
    Hkv, D = 2, 16
    index = make_index([1, 21, 16, 5], Hkv, D, dtype, rank=8)
    q = torch.randn(B, Hkv * G, D).to(dtype)
    got = keymax_dense_scores(
        q, index.basis, index.lowrank_keys, index.chunk_offsets, block_n=16,
        max_programs=max_programs, project_first=project_first,
    )  # fmt: skip
    ref = keymax_scores_ref(q, index.basis, index.lowrank_keys, index.chunk_offsets)
    assert got.shape == (B, Hkv, 4) and got.is_contiguous()
    assert rel_err(got, ref) < TOL[dtype]
    # the router's key-max scores are these (one launch), and route picks their top-k
    assert rel_err(score_chunks(q, index, "keymax"), got) < 1e-5  # other block_n: rounding
    sel = route(q, index, 2, "keymax", per_kv_head=True)
    picked = torch.zeros(B, Hkv, 4, dtype=torch.bool)
    picked[sel.req.long(), sel.kv_head.long(), sel.chunk.long()] = True
    assert picked.sum() == B * Hkv * 2
    worst_kept = got.masked_fill(~picked, float("inf")).amin(-1)
    best_left = got.masked_fill(picked, float("-inf")).amax(-1)
    assert bool((worst_kept >= best_left).all())


@pytest.mark.parametrize("dtype,G,R", [(torch.float32, 3, 12), (torch.float16, 4, 16)])
def test_project_queries_kernel(dtype, G, R):
    """Queries on each KV head's basis, one launch, against fp32 torch (an odd group and a
    rank that is not a power of two); fp16 projections clamp to fp16's range."""
    Hkv, D, B = 2, 24, 5
    basis = torch.linalg.qr(torch.randn(Hkv, D, R))[0].to(dtype)
    q = torch.randn(B, Hkv * G, D).to(dtype)
    q[0, 0] = 6e4  # finite in fp16, its projection past fp16's range (clamped)
    got = project_queries(q, basis, dtype)
    want = project_queries(q, basis, dtype, use_triton=False)
    assert got.dtype == want.dtype == dtype and got.shape == (B, Hkv * G, R)
    assert bool(torch.isfinite(got).all())
    assert rel_err(got, want) < TOL[dtype]


def test_pair_scores_written_into_the_table():
    """Two-stage's table path: each pair's scores land at [req, :, chunk], the rest stay
    -inf, equal to the [P, Hkv] path."""
    Hkv, D, G, B = 2, 16, 2, 3
    index = make_index([7, 3, 12], Hkv, D, torch.float32, rank=4, seed=1)
    q = torch.randn(B, Hkv * G, D)
    pair_chunk = torch.tensor([0, 0, 1, 2, 2], dtype=torch.int32)  # sorted by chunk
    pair_req = torch.tensor([0, 2, 1, 0, 1], dtype=torch.int32)
    args = (q, index.basis, index.lowrank_keys, index.chunk_offsets, pair_req, pair_chunk)
    rows = keymax_pair_scores(*args, block_b=16, block_n=16)
    table = torch.full((B, Hkv, 3), float("-inf"))
    out = keymax_pair_scores(*args, block_b=16, block_n=16, out=table)
    assert out is table
    want = torch.full((B, Hkv, 3), float("-inf"))
    want[pair_req.long(), :, pair_chunk.long()] = rows
    assert torch.equal(table, want)
    ref = keymax_scores_ref(q, index.basis, index.lowrank_keys, index.chunk_offsets)
    assert rel_err(rows, ref[pair_req.long(), :, pair_chunk.long()]) < 1e-4
    with pytest.raises(ValueError, match="out must be"):
        keymax_pair_scores(*args, out=torch.empty(B, Hkv, 2))


@pytest.mark.parametrize(
    "counts,block_b",
    [
        ([3, 0, 40, 1, 20, 7], 16),  # empty chunks, a chunk of several tiles
        ([0, 0, 5], 4),
        (torch.randint(0, 40, (1100,), generator=torch.Generator().manual_seed(2)).tolist(), 32),
    ],  # the last: more chunks than one 1,024-chunk block of the scan
)
def test_pair_tiles_kernel_matches_reference(counts, block_b):
    """The one-launch work list equals the torch one: tiles of up to block_b pairs of one
    chunk in chunk order, then empty tiles (start = end = P) up to cdiv(P, block_b) + C."""
    pair_chunk = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)]).int()
    got = pair_tiles(pair_chunk, len(counts), block_b)
    want = pair_tiles(pair_chunk, len(counts), block_b, use_triton=False)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    start, end, chunk = got
    real = start < pair_chunk.numel()
    assert int((end - start)[real].sum()) == pair_chunk.numel()  # every pair in one tile
    assert bool((pair_chunk[start[real].long()] == chunk[real]).all())


def test_keymax_router_cost_counts_every_key_at_its_rank():
    B, Hq, Hkv, D, C, L = 4, 8, 2, 64, 16, 128
    by, fl = router_cost("keymax", B, Hq, Hkv, D, C, L, 16, 0, 0)
    by32, fl32 = router_cost("keymax", B, Hq, Hkv, D, C, L, 32, 0, 0)
    assert by == C * L * Hkv * 16 * 2 and fl == 2 * B * C * L * Hq * 16
    assert (by32, fl32) == (2 * by, 2 * fl)  # twice the rank, twice the work
    ts_bytes, ts_flops = router_cost("two_stage", B, Hq, Hkv, D, C, L, 16, 4, 8)
    assert ts_flops < fl and ts_bytes < by  # the shortlist reads and computes less


@pytest.mark.skipif(not CUDA, reason="needs CUDA (TRITON_INTERPRET=0 pytest -m cuda)")
@pytest.mark.parametrize("rank", [32, 64])
def test_dense_keymax_cuda_8b_dims(rank):
    """8B dims (Hq 32, Hkv 8, D 128), bf16 pool, fp16 low-rank keys, 4,096-key chunks: the
    compiled kernel against the reference, and the same top-k as the pair kernel."""
    Hkv, D, G, B, C = 8, 128, 4, 96, 12
    index = make_index([4096] * C, Hkv, D, torch.bfloat16, rank, "cuda")
    q = torch.randn(B, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
    got = score_chunks(q, index, "keymax")
    ref = keymax_scores_ref(q, index.basis, index.lowrank_keys, index.chunk_offsets)
    assert rel_err(got, ref) < TOL[torch.bfloat16]
    pair_chunk = torch.arange(C, dtype=torch.int32, device="cuda").repeat_interleave(B)
    pair_req = torch.arange(B, dtype=torch.int32, device="cuda").repeat(C)
    pairs = keymax_pair_scores(
        q, index.basis, index.lowrank_keys, index.chunk_offsets, pair_req, pair_chunk,
        block_b=32, num_stages=5,
    )  # fmt: skip
    assert rel_err(pairs.view(C, B, Hkv).permute(1, 2, 0), got) < TOL[torch.bfloat16]
    two = route(q, index, 3, "two_stage", shortlist_factor=4)
    assert two.req.numel() == B * Hkv * 3
