"""Sort-free selection building (from_topk) vs the sort-based reference."""

import pytest
import torch

from moska.kernels.merge import merge_selections, merge_selections_ref
from moska.kernels.selections import Selections, from_topk, from_topk_ref


def random_topk(B: int, Hr: int, K: int, C: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(C, generator=gen)[:K] for _ in range(B * Hr)]).view(B, Hr, K)


@pytest.mark.parametrize(
    "B,Hkv,per_head,K,C",
    [
        (1, 1, False, 1, 1),
        (5, 2, False, 3, 7),
        (9, 4, True, 2, 5),
        (33, 3, False, 6, 6),
        (4, 8, True, 1, 30),
    ],
)
def test_from_topk_matches_sort(B, Hkv, per_head, K, C):
    gen = torch.Generator().manual_seed(B * 100 + C)
    Hr = Hkv if per_head else 1
    idx = random_topk(B, Hr, K, C, gen)
    got = from_topk(idx, Hkv, C)
    want = from_topk_ref(idx, Hkv)
    for name in ("req", "kv_head", "chunk", "row_order"):
        t = getattr(got, name)
        assert t.dtype == torch.int32, name
        assert torch.equal(t, getattr(want, name)), name
    assert torch.equal(got.row_offsets, torch.arange(0, B * Hkv * K + 1, K, dtype=torch.int32))
    # row_order really lists each (req, kv_head)'s K selections in its segment
    r = got.req[got.row_order.long()].view(B, Hkv, K)
    h = got.kv_head[got.row_order.long()].view(B, Hkv, K)
    c = got.chunk[got.row_order.long()].view(B, Hkv, K)
    assert torch.equal(r, torch.arange(B)[:, None, None].expand(B, Hkv, K).int())
    assert torch.equal(h, torch.arange(Hkv)[None, :, None].expand(B, Hkv, K).int())
    assert torch.equal(c.long(), idx.repeat_interleave(Hkv // Hr, dim=1))


def test_from_topk_empty_and_bad_shape():
    sel = from_topk(torch.zeros(0, 1, 3, dtype=torch.long), 2, 4)
    assert sel.req.numel() == 0 and sel.row_offsets.tolist() == [0]
    with pytest.raises(ValueError, match="Hr=3"):
        from_topk(torch.zeros(2, 3, 1, dtype=torch.long), 2, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_with_row_order_equals_sorted_merge(dtype):
    """merge_selections with the router's row order == without it == the reference."""
    gen = torch.Generator().manual_seed(3)
    B, Hkv, G, D, K, C = 6, 2, 3, 32, 3, 5
    sel = from_topk(random_topk(B, 1, K, C, gen), Hkv, C)
    n = sel.req.numel()
    o_base = torch.randn(B, Hkv * G, D, generator=gen).to(dtype)
    lse_base = torch.randn(B, Hkv * G, generator=gen)
    o_sel = torch.randn(n, G, D, generator=gen).to(dtype)
    lse_sel = torch.randn(n, G, generator=gen)
    o1, l1 = merge_selections(o_base, lse_base, o_sel, lse_sel, sel)
    o2, l2 = merge_selections(o_base, lse_base, o_sel, lse_sel, Selections(*sel[:3]))
    o_ref, l_ref = merge_selections_ref(o_base, lse_base, o_sel, lse_sel, sel)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for o in (o1, o2):
        assert ((o.float() - o_ref).norm() / o_ref.norm()).item() < tol
    assert ((l1 - l_ref).abs().max() / l_ref.abs().max()).item() < 1e-4
    assert ((l2 - l_ref).abs().max() / l_ref.abs().max()).item() < 1e-4
