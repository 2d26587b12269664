"""The per-KV-head paged decode kernel against its plain-PyTorch reference (interpreter)."""

import pytest
import torch

from moska.kernels.paged_heads import paged_decode_heads, paged_decode_heads_ref

TOL = {torch.float16: 1e-2, torch.float32: 1e-4}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _lists(b, hkv, n_pages, bs, gen):
    """Random per-head page lists (distinct shuffled pages) and token counts, one head empty."""
    max_pages = 6
    tables = torch.full((b, hkv, max_pages), n_pages - 1, dtype=torch.int32)
    lens = torch.zeros(b, hkv, dtype=torch.int32)
    for i in range(b):
        for h in range(hkv):
            if (i, h) == (b - 1, hkv - 1):
                continue  # an empty list: o = 0, lse = -inf
            n = int(torch.randint(1, max_pages * bs + 1, (), generator=gen))
            pages = torch.randperm(n_pages - 1, generator=gen)[: -(-n // bs)]
            tables[i, h, : len(pages)] = pages.int()
            lens[i, h] = n
    return tables, lens


@pytest.mark.parametrize(
    "dtype,per_head_pool", [(torch.float16, True), (torch.float32, False), (torch.float32, True)]
)
def test_decode_heads_matches_reference(dtype, per_head_pool):
    gen = torch.Generator().manual_seed(1)
    b, hkv, g, d, bs, n_pages = 3, 2, 3, 32, 16, 20
    pool_heads = 1 if per_head_pool else hkv
    k = torch.randn(n_pages, bs, pool_heads, d, generator=gen).to(dtype)
    v = torch.randn(n_pages, bs, pool_heads, d, generator=gen).to(dtype)
    q = torch.randn(b, hkv * g, d, generator=gen).to(dtype)
    tables, lens = _lists(b, hkv, n_pages, bs, gen)
    o, lse = paged_decode_heads(q, k, v, tables, lens, 0.2, num_splits=2, block_n=16)
    o_ref, lse_ref = paged_decode_heads_ref(q, k, v, tables, lens, 0.2)
    assert o.dtype == dtype and o.shape == (b, hkv * g, d)
    assert _rel(o, o_ref) < TOL[dtype]
    empty = torch.isinf(lse_ref)
    assert empty.sum() == g and torch.equal(torch.isinf(lse), empty)
    assert _rel(lse[~empty], lse_ref[~empty]) < TOL[dtype]
    assert (o[empty] == 0).all()


def test_full_lists_equal_plain_paged_reference():
    """Every head listing the sequence's whole block table is plain paged attention."""
    from moska.kernels.paged_attention import paged_attention_ref

    gen = torch.Generator().manual_seed(2)
    b, hkv, g, d, bs = 2, 2, 2, 16, 8
    k = torch.randn(10, bs, hkv, d, generator=gen)
    v = torch.randn(10, bs, hkv, d, generator=gen)
    q = torch.randn(b, hkv * g, d, generator=gen)
    bt = torch.tensor([[3, 1, 7, 0], [2, 9, 4, 5]], dtype=torch.int32)
    seq = torch.tensor([27, 32], dtype=torch.int32)
    tables = bt[:, None, :].expand(b, hkv, 4).contiguous()
    lens = seq[:, None].expand(b, hkv).contiguous()
    o, lse = paged_decode_heads_ref(q, k, v, tables, lens, 0.3)
    cu = torch.arange(b + 1, dtype=torch.int32)
    o2, lse2 = paged_attention_ref(q, k, v, bt, cu, seq, 0.3)
    assert _rel(o, o2) < 1e-5 and _rel(lse, lse2) < 1e-5


def test_slot_heads_read_other_heads_slices():
    """slot_heads: entry block * Hkv + j reads head j's slice of the block, for any head."""
    gen = torch.Generator().manual_seed(3)
    b, hkv, g, d, bs, n_blocks = 2, 2, 2, 16, 8, 6
    k = torch.randn(n_blocks, bs, hkv, d, generator=gen)
    v = torch.randn(n_blocks, bs, hkv, d, generator=gen)
    q = torch.randn(b, hkv * g, d, generator=gen)
    tables, lens = _lists(b, hkv, n_blocks * hkv, bs, gen)
    o, lse = paged_decode_heads(q, k, v, tables, lens, 0.3, slot_heads=True, block_n=16)
    o_ref, lse_ref = paged_decode_heads_ref(q, k, v, tables, lens, 0.3, slot_heads=True)
    assert _rel(o, o_ref) < 1e-4
    # the same lists over a per-head pool holding each (block, head) slice as one page
    pool_k = k.permute(0, 2, 1, 3).reshape(n_blocks * hkv, bs, 1, d)
    pool_v = v.permute(0, 2, 1, 3).reshape(n_blocks * hkv, bs, 1, d)
    o2, _ = paged_decode_heads_ref(q, pool_k, pool_v, tables, lens, 0.3)
    assert _rel(o_ref, o2) < 1e-6
    ok = ~torch.isinf(lse_ref)
    assert _rel(lse[ok], lse_ref[ok]) < 1e-4
