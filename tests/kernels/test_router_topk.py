"""The router's one-launch row top-k (router_topk.py) against its plain-PyTorch reference
(stable descending sort: ties to the lower index, NaN above every number) and against
torch.topk's chosen set; route() with it picks the chunks it picked before."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from moska.kernels import router
from moska.kernels.router import build_routing_index, route
from moska.kernels.router_topk import topk_rows, topk_rows_ref

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"


def as_sets(idx: torch.Tensor, C: int) -> torch.Tensor:
    return torch.zeros(*idx.shape[:-1], C, dtype=torch.bool).scatter(-1, idx.cpu(), True)


@pytest.mark.parametrize("R,C,k", [(5, 37, 4), (3, 16, 16), (33, 8, 1)])
def test_row_topk_matches_the_reference(R, C, k):
    """Odd widths, k = C, more rows than one program; ties (values rounded to a coarse grid),
    -inf and NaN entries: the same indices in the same order as the reference, and the
    same sets as torch.topk in rows without a tie at the k-th value."""
    x = torch.randn(R, C)
    x[0] = (x[0] * 2).round() / 2  # many ties
    x[1, :3] = float("-inf")
    x[-1, C // 2] = float("nan")
    got = topk_rows(x, k)
    want = topk_rows_ref(x, k)
    assert got.dtype == torch.int64 and got.shape == (R, k)
    assert torch.equal(got, want)
    clean = torch.nan_to_num(x, nan=float("inf"))
    ordered = clean.sort(dim=-1, descending=True).values
    untied = torch.ones(R, dtype=torch.bool) if k == C else ordered[:, k - 1] != ordered[:, k]
    assert torch.equal(as_sets(got, C)[untied], as_sets(clean.topk(k).indices, C)[untied])


def test_route_picks_the_same_chunks_with_the_row_topk(monkeypatch):
    """The default router's path (per KV head) and the per-request sum, with an always-read
    chunk: the same Selections with ROW_TOPK on as with torch.topk."""
    gen = torch.Generator().manual_seed(5)
    offsets = torch.tensor([0, 9, 20, 26, 40, 47], dtype=torch.int32)
    index = build_routing_index(torch.randn(47, 2, 16, generator=gen), offsets, rank=8)
    q = torch.randn(4, 4, 16, generator=gen)
    for per_kv_head in (True,):  # the sum over heads reaches it the same way ([B, 1, C])
        monkeypatch.setattr(router, "ROW_TOPK", False)
        want = route(q, index, 2, "keymax", per_kv_head=per_kv_head, always=[4])
        monkeypatch.setattr(router, "ROW_TOPK", True)
        got = route(q, index, 2, "keymax", per_kv_head=per_kv_head, always=[4])
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_k():
    with pytest.raises(ValueError, match="k <= C"):
        topk_rows(torch.randn(2, 3), 4)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA (TRITON_INTERPRET=0 pytest -m cuda)")
def test_row_topk_cuda_on_fp16_valued_scores():
    """[1,024 x 8, 256] scores rounded to fp16 (the key-max scores' values, so the k-th
    value ties now and then): the reference's indices exactly; torch.topk's sets in every
    untied row (the share of rows equal to torch.topk's set printed, ties included)."""
    x = torch.randn(1024, 8, 256, device="cuda").mul(4).half().float()
    got = topk_rows(x, 8)
    assert torch.equal(got, topk_rows_ref(x, 8))
    ordered = x.sort(dim=-1, descending=True).values
    untied = (ordered[..., 7] != ordered[..., 8]).cpu()
    torch_sets = as_sets(x.topk(8).indices, 256)
    assert torch.equal(as_sets(got, 256)[untied], torch_sets[untied])
    same = (as_sets(got, 256) == torch_sets).all(-1).float().mean().item()
    print(f"row top-k: tied rows {1 - untied.float().mean().item():.4f}, rows equal to "
          f"torch.topk's set {same:.4f}")  # fmt: skip
