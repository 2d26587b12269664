"""A FlexiCache re-ranking step issues its ranking, allocation, evictions and fetches without
reading device values on the host (each such read is a wait on the device on CUDA), except
one read of every layer's counts at the end of the step; its output still equals attention
over each head's kept pages, computed here from all the keys and values written."""

from __future__ import annotations

import pytest
import torch

from moska.flexicache import FlexiCacheConfig
from moska.flexicache.host_reads import count_host_reads, uncounted
from moska.flexicache.store import FlexiKV
from moska.kernels.paged_heads import paged_decode_heads_ref

L, B, H, G, D, BS, P, T0 = 3, 2, 2, 2, 16, 4, 16, 42  # prompt: 42 tokens, pages 0..10
decode = uncounted(paged_decode_heads_ref)  # the CPU reference kernel's reads are not the store's


def _reference(store, layer, q, keys, vals):
    """o [B, Hq, D]: each query head over its KV head's kept pages (all their tokens)."""
    out = torch.empty(B, H * G, D)
    n = store.length
    for b in range(B):
        for h in range(H):
            pages = store.kept[layer, b, h].nonzero().flatten()
            tok = (pages[:, None] * BS + torch.arange(BS)).flatten()
            tok = tok[tok < n]
            k, v = keys[layer][b, tok, h], vals[layer][b, tok, h]
            for g in range(G):
                qh = q[b, h * G + g]
                out[b, h * G + g] = torch.softmax(k @ qh * 0.25, 0) @ v
    return out


@pytest.mark.parametrize("forced", [True, False])
def test_rerank_step_reads_nothing_back_until_its_end(forced):
    """forced: stable heads fixed (the speed bench's classes): the pools hold every head's
    worst case, no layer reads anything; otherwise (heads may turn unstable) a layer reads
    its counts once at most to size its pool."""
    gen = torch.Generator().manual_seed(7)
    cfg = FlexiCacheConfig(
        top_k_pages=2, recent_pages=1, sink_pages=1, rerank_interval=4,
        threshold=2.0 if forced else 0.5,
    )  # fmt: skip
    force = torch.rand(L, B, H, generator=gen) < 0.6 if forced else None
    if force is not None:
        force[0, 0, 0] = True  # at least one stable head
    store = FlexiKV(
        cfg, num_layers=L, batch=B, num_kv_heads=H, head_dim=D, block_size=BS, max_pages=P,
        dtype=torch.float32, device="cpu", force_stable=force, zero_copy=True,
    )  # fmt: skip
    keys = [torch.randn(B, P * BS, H, D, generator=gen) for _ in range(L)]
    vals = [torch.randn(B, P * BS, H, D, generator=gen) for _ in range(L)]
    for layer in range(L):
        for b in range(B):
            q_last = torch.randn(H * G, D, generator=gen)
            store.write_prompt(layer, b, keys[layer][b, :T0], vals[layer][b, :T0], q_last)
    store.finish_prompts(0.25)
    reads: dict[str, list[int]] = {}
    for step in range(2 * cfg.rerank_interval + 1):  # re-ranks at steps 0 (pools built), 4, 8
        store.begin_step()
        pos = store.length - 1
        kind = "rerank" if step % cfg.rerank_interval == 0 else "other"
        fetched = store.fetched_pages
        outs = []
        with count_host_reads() as n:
            for layer in range(L):
                q = torch.randn(B, H * G, D, generator=gen)
                o = store.attend(layer, q, keys[layer][:, pos], vals[layer][:, pos], decode, 0.25)
                outs.append((q, o))
        if step:
            reads.setdefault(kind, []).append(n.n)
        if kind == "rerank" and step:
            assert store.fetched_pages > fetched  # the step fetched promoted pages
        for layer, (q, o) in enumerate(outs):
            ref = _reference(store, layer, q, keys, vals)
            torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    assert reads["other"] == [0] * len(reads["other"])  # a page starts at step 2
    assert max(reads["rerank"]) <= (1 if forced else L + 1), reads
    assert store.stable.any() and not store.stable.all()
