"""The page store's host copies (moska/flexicache/transfer.py): a decode-written page reaches
the host copy once full, and a re-ranking that promotes it after it left the pool fetches
exactly what was written; a page boundary only gives the new page a slot."""

from __future__ import annotations

import math

import pytest
import torch

from moska.flexicache import FlexiCacheConfig, policy
from moska.flexicache.store import FlexiKV
from moska.flexicache.transfer import fetch_in_place
from moska.kernels.page_gather import gather_rows, gather_rows_ref
from moska.kernels.paged_heads import paged_decode_heads_ref


def _step(store, q, k, v):
    store.begin_step()
    return store.attend(0, q[None, None], k[None, None], v[None, None], paged_decode_heads_ref, 1.0)


@pytest.mark.parametrize("zero_copy", [False, True])  # host gather, the in-place kernel
def test_decode_written_page_is_written_back_and_fetched_when_promoted(zero_copy):
    torch.manual_seed(4)
    d, t = 16, 40  # prompt: pages 0..9 of 4 tokens
    keys = 0.05 * torch.randn(t, 1, d)
    keys[12:16, 0, 0] = 10.0  # page 3: e0's
    keys[20:24, 0, 0] = 5.0  # page 5
    keys[28:32, 0, 1] = 8.0  # page 7: e1's second
    cfg = FlexiCacheConfig(
        top_k_pages=2, recent_pages=1, threshold=0.0, rerank_interval=4, sink_pages=0
    )
    store = FlexiKV(
        cfg, num_layers=1, batch=1, num_kv_heads=1, head_dim=d, block_size=4, max_pages=16,
        dtype=torch.float32, device="cpu", hysteresis=False, zero_copy=zero_copy,
    )  # fmt: skip
    e0, e1 = torch.eye(d)[0], torch.eye(d)[1]
    store.write_prompt(0, 0, keys, torch.randn(t, 1, d), e0[None])
    store.finish_prompts()
    new_k, new_v = 0.05 * torch.randn(13, d), torch.randn(13, d)
    new_k[:4, 1] += 9.0  # page 10, written while decoding: e1's first
    for i in range(12):  # tokens 40..51 (pages 10-12); page 10 leaves the pool at step 4
        _step(store, e0, new_k[i], new_v[i])
    slot = store.slot[0, 0, 0]
    assert slot[10] == -1 and store.kept[0, 0, 0, [3, 5]].all()
    fetched = store.fetched_pages
    o = _step(store, e1, new_k[12], new_v[12])  # step 12 re-ranks: {10, 7}
    assert slot[10] >= 0 and slot[7] >= 0 and store.fetched_pages == fetched + 2
    assert store.zero_copy == zero_copy  # the kernel was used, not dropped for the host path
    torch.testing.assert_close(store.pool_k[0][slot[10], :, 0], new_k[:4])
    torch.testing.assert_close(store.pool_v[0][slot[10], :, 0], new_v[:4])
    store.write_back.flush()
    torch.testing.assert_close(store.host_k[0, 0, 0, 10:12].reshape(8, d), new_k[:8])
    torch.testing.assert_close(store.host_v[0, 0, 0, 10:12].reshape(8, d), new_v[:8])
    # the output reads pages 10, 7 and the newest token
    kk = torch.cat([new_k[:4], keys[28:32, 0], new_k[12:13]])
    vv = torch.cat([new_v[:4], store.host_v[0, 0, 0, 7], new_v[12:13]])
    ref = torch.softmax(kk @ e1, 0) @ vv
    torch.testing.assert_close(o[0, 0], ref, rtol=1e-5, atol=1e-5)


def test_page_boundary_gives_the_new_page_slots_without_a_fetch():
    torch.manual_seed(5)
    cfg = FlexiCacheConfig(top_k_pages=2, recent_pages=2, threshold=0.0, rerank_interval=8)
    store = FlexiKV(
        cfg, num_layers=1, batch=2, num_kv_heads=2, head_dim=16, block_size=4, max_pages=12,
        dtype=torch.float32, device="cpu",
    )  # fmt: skip
    for row in range(2):
        store.write_prompt(
            0, row, torch.randn(28, 2, 16), torch.randn(28, 2, 16), torch.randn(2, 16)
        )
    store.finish_prompts()
    q = torch.randn(2, 2, 16)
    for _ in range(4):  # step 0 (re-ranks) and the rest of page 7
        store.begin_step()
        store.attend(
            0, q, torch.randn(2, 2, 16), torch.randn(2, 2, 16), paged_decode_heads_ref, 1.0
        )
    fetched, resident = store.fetched_pages, store.resident_pages()
    store.begin_step()  # token 32: page 8 starts
    store.attend(0, q, torch.randn(2, 2, 16), torch.randn(2, 2, 16), paged_decode_heads_ref, 1.0)
    assert store.fetched_pages == fetched and (store.slot[0, :, :, 8] >= 0).all()
    # page 6 left the recent window: still in its slot (hysteresis), no longer read
    assert store.resident_pages() == resident + 4
    assert (store.kept[0, :, :, 6] == store.top[0].eq(6).any(-1)).all()


def test_rerank_marks_missing_picks():
    scores = torch.rand(1, 2, 6)
    cand = torch.tensor([[False, True, True, False, False, False]])  # 2 candidates, K = 3
    top, _, _ = policy.rerank(scores, cand, torch.full((1, 2, 3), -1), 0.5)
    assert sorted(top[0, 0].tolist()) == [-1, 1, 2] and sorted(top[0, 1].tolist()) == [-1, 1, 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gather_rows_matches_reference(dtype):
    src = torch.randn(12, 4, 16).to(dtype)
    dst = torch.randn(9, 4, 16).to(dtype)
    dst_before = dst.clone()
    # padded lists: entries with a negative destination are unused (their source too)
    src_idx, dst_idx = torch.tensor([7, 0, 11, 3, -1, 5]), torch.tensor([2, 8, 0, 5, -1, -1])
    want = dst.clone()
    gather_rows_ref(src, src_idx, want, dst_idx)
    gather_rows(src, src_idx, dst, dst_idx)
    torch.testing.assert_close(dst, want, rtol=0, atol=0)
    untouched = torch.ones(9, dtype=torch.bool)
    untouched[[2, 8, 0, 5]] = False
    assert not (dst[[2, 8, 0, 5]] == dst_before[[2, 8, 0, 5]]).all()
    torch.testing.assert_close(dst[untouched], dst_before[untouched], rtol=0, atol=0)
    with pytest.raises(ValueError, match="rows differ"):
        gather_rows(src, src_idx, dst[:, :2].contiguous(), dst_idx)
    # the store's first fetch checks the kernel's copies against the host copy
    k, v = src.flatten(1), src.flatten(1) + 1
    pk, pv = torch.zeros_like(dst.flatten(1)), torch.zeros_like(dst.flatten(1))
    assert fetch_in_place(k, v, pk, pv, src_idx, dst_idx, check=True) is True
    torch.testing.assert_close(pv[[2, 8, 0, 5]], v[[7, 0, 11, 3]], rtol=0, atol=0)
    unused = torch.full((3,), -1)
    assert fetch_in_place(k, v, pk, pv, unused, unused, check=True) is None  # nothing to check


def test_store_on_a_reused_host_buffer_equals_one_with_its_own_copy():
    """The speed bench lends each store views of one pinned buffer (stale bytes of the last
    store): what the store writes and reads must not depend on them."""
    torch.manual_seed(6)
    cfg = FlexiCacheConfig(top_k_pages=2, recent_pages=1, threshold=0.0, rerank_interval=4)
    shape = (1, 2, 2, 12, 4, 16)
    n = math.prod(shape)
    buf = torch.randn(2, n + 7)  # larger than needed, filled with an earlier row's bytes

    def make(host=None):
        return FlexiKV(
            cfg, num_layers=1, batch=2, num_kv_heads=2, head_dim=16, block_size=4,
            max_pages=12, dtype=torch.float32, device="cpu", host=host,
        )  # fmt: skip

    own, lent = make(), make((buf[0, :n].view(shape), buf[1, :n].view(shape)))
    assert lent.host_k.data_ptr() == buf[0].data_ptr()
    prompt = [(torch.randn(30, 2, 16), torch.randn(30, 2, 16), torch.randn(2, 16)) for _ in "ab"]
    for store in (own, lent):
        for row, (k, v, q) in enumerate(prompt):
            store.write_prompt(0, row, k, v, q)
        store.finish_prompts()
    for _ in range(10):  # pages 7..9 written while decoding, two re-rankings
        q, k, v = torch.randn(3, 2, 2, 16)
        a, b = (_attend(s, q, k, v) for s in (own, lent))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="host copy"):
        make((buf[0, : n // 2].view(1, 1, 2, 12, 4, 16), buf[1, : n // 2].view(1, 1, 2, 12, 4, 16)))


def _attend(store, q, k, v):
    store.begin_step()
    return store.attend(0, q, k, v, paged_decode_heads_ref, 1.0)
