"""FlexiCache re-ranking after the step, every layer at once (`FlexiKV.deferred_rerank`).

Why: a re-ranking inside the step (`FlexiKV.attend`) issues some 130 small ops per layer
from Python (scores, top-K, keep masks, slot allocation, fetch lists, head lists): about
4,000 launches, and the step cannot be replayed from a CUDA graph. On the H200 at B = 38 such
a step took 120 ms of wall time against 14 ms for a plain one. Deferred, the re-ranking step
runs as a plain step (replayable; every layer's query is kept in a buffer, `_q_buf`) and
`apply_rerank` then ranks with those queries: scores per layer (the store's `_scores`,
which the speed bench wraps), and top-K, stability, keep masks and head lists for all layers
in one batch of ops each; only slot allocation and fetches stay per layer (each layer has
its own pool). The new kept sets take effect from the next step: the ranking uses the
query of step t (as before) and the pages it picks are read from step t + 1 instead of t.
A page start is prepared the same way after the step before it (`prepare_page_start`), so
that in deferred mode every step but the first replays from a graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moska.flexicache import policy

if TYPE_CHECKING:
    from moska.flexicache.store import FlexiKV


def due(store: FlexiKV) -> bool:
    """Whether the step just run re-ranks after it (deferred mode; not the first step, which
    builds the pools inside the step)."""
    return store.deferred_rerank and store.step > 0 and store.step % store.cfg.rerank_interval == 0


def apply_rerank(store: FlexiKV, sm_scale: float) -> None:
    """Re-rank every layer with the queries of the step just run (`store._q_buf`), fetch the
    pages newly kept, rebuild the head lists, and compact (one read of every layer's counts)."""
    L, B, H, P, bs, _ = store.shape
    cfg = store.cfg
    qs = store._q_buf
    assert qs is not None, "a deferred re-ranking follows a step that kept its queries"
    scores = torch.stack([store._scores(layer, qs[layer], sm_scale) for layer in range(L)])
    flat = (L * B, H)
    cand = store._shared("cand").repeat(L, 1)  # [L * B, P]
    top, stable, _ = policy.rerank(
        scores.view(*flat, P), cand, store.top.view(*flat, -1), cfg.threshold
    )
    stable = stable.view(L, B, H)
    if store.force_stable is not None:
        stable = stable | store.force_stable
    store.top.copy_(top.view(store.top.shape))
    store.stable.copy_(stable)
    valid, window = store._shared("windows")
    keep = policy.keep_mask_windows(
        store.top.view(*flat, -1),
        stable.view(*flat),
        store._active.repeat(L),
        (valid.repeat(L, 1), window.repeat(L, 1)),
    ).view(L, B, H, P)
    for layer in range(L):
        store._sync(layer, keep[layer], fresh=None)  # a page started now has its slots
    seq = store._seq.repeat(L)
    tables, lens = policy.head_lists(
        keep.view(*flat, P), store.slot.view(*flat, P), seq, bs, store._shared("pad").repeat(L)
    )
    store.tables.copy_(tables.view(store.tables.shape))
    store.lens.copy_(lens.view(store.lens.shape))
    store._lens_base.copy_(store.lens)
    store._base_len = [store.length] * L
    store.compact_all()


def prepare_page_start(store: FlexiKV) -> None:
    """After a step, when the next one starts a page: every layer's page start as that step
    would do it (the new page gets a slot per head, the page leaving the recent window is
    dropped by stable heads, the head lists rebuilt at the next length, in one batch), so
    the next step is plain (replayable) and writes its token into the prepared slots."""
    L, B, H, P, bs, _ = store.shape
    length = store.length + 1
    n = -(-length // bs)
    n_pages = torch.full((B,), n, device=store.device)
    active = torch.full((L * B,), store.cfg.long_enough(n), device=store.device)
    valid, window = policy.window_masks(n_pages, store.cfg.recent_pages, P, store.cfg.sink_pages)
    flat = (L * B, H)
    keep = policy.keep_mask_windows(
        store.top.view(*flat, -1), store.stable.view(*flat), active,
        (valid.repeat(L, 1), window.repeat(L, 1)),
    ).view(L, B, H, P)  # fmt: skip
    store.step += 1  # as at the next step (dropped pages' step)
    try:
        for layer in range(L):
            store._start_page(layer, keep[layer], n - 1)
    finally:
        store.step -= 1
    seq = torch.full((L * B,), length, device=store.device)
    pad = policy.last_page_pad(seq, bs)
    tables, lens = policy.head_lists(keep.view(*flat, P), store.slot.view(*flat, P), seq, bs, pad)
    store.tables.copy_(tables.view(store.tables.shape))
    store.lens.copy_(lens.view(store.lens.shape))
    store._lens_base.copy_(store.lens)
    store._base_len = [length] * L
    store._page_ready = length
