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

Spread (`FlexiKV.rerank_spread`): a whole re-ranking after one step in r still cost that
step 165 ms on the H200 at B = 38 (32 layers' fetches and some 4,000 launches, then a wait
on their counts) against 13 ms for a plain step. Spread, each step re-ranks one slice of
ceil(L / r) consecutive layers (`spread_layers`), so every layer is still re-ranked every r
steps (with the query of the step just run) and no step pays for all of them: the slice's
launches are issued while the step's graph replays and its fetches are 1/r of a
re-ranking's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moska.flexicache import policy

if TYPE_CHECKING:
    from moska.flexicache.store import FlexiKV


def due(store: FlexiKV) -> bool:
    """Whether the step just run re-ranks after it (deferred mode; not the first step, which
    builds the pools inside the step): every layer each r-th step, or spread, a slice of
    layers (possibly none) each step."""
    if not store.deferred_rerank or store.step <= 0:
        return False
    return store.rerank_spread or store.step % store.cfg.rerank_interval == 0


def spread_layers(store: FlexiKV) -> range:
    """The layers re-ranked after the step just run: every layer, or spread, the slice
    ceil(L / r) * (step % r) ... of consecutive layers (empty past the last layer when r
    does not divide L evenly); over r steps each layer exactly once."""
    n_layers = store.shape[0]
    if not store.rerank_spread:
        return range(n_layers)
    r = store.cfg.rerank_interval
    per = -(-n_layers // r)
    first = per * (store.step % r)
    return range(min(first, n_layers), min(first + per, n_layers))


def apply_rerank(store: FlexiKV, sm_scale: float, layers: range | None = None) -> None:
    """Re-rank `layers` (consecutive; None: every layer) with the queries of the step just
    run (`store._q_buf`) in one batch of ops, fetch the pages newly kept, rebuild the
    layers' head lists, and compact (one read of every layer's counts)."""
    L, B, H, P, bs, _ = store.shape
    layers = range(L) if layers is None else layers
    n = len(layers)
    if not n:
        return
    sl = slice(layers.start, layers.stop)
    cfg = store.cfg
    qs = store._q_buf
    assert qs is not None, "a deferred re-ranking follows a step that kept its queries"
    scores = torch.stack([store._scores(layer, qs[layer], sm_scale) for layer in layers])
    flat = (n * B, H)
    cand = store._shared("cand").repeat(n, 1)  # [n * B, P]
    top, stable, _ = policy.rerank(
        scores.view(*flat, P), cand, store.top[sl].reshape(*flat, -1), cfg.threshold
    )
    stable = stable.view(n, B, H)
    if store.force_stable is not None:
        stable = stable | store.force_stable[sl]
    store.top[sl] = top.view(n, B, H, -1)
    store.stable[sl] = stable
    valid, window = store._shared("windows")
    keep = policy.keep_mask_windows(
        top, stable.view(*flat), store._active.repeat(n), (valid.repeat(n, 1), window.repeat(n, 1))
    ).view(n, B, H, P)
    for i, layer in enumerate(layers):
        store._sync(layer, keep[i], fresh=None)  # a page started now has its slots
    seq = store._seq.repeat(n)
    tables, lens = policy.head_lists(
        keep.view(*flat, P), store.slot[sl].reshape(*flat, P), seq, bs,
        store._shared("pad").repeat(n),
    )  # fmt: skip
    store.tables[sl] = tables.view(n, B, H, P)
    store.lens[sl] = lens.view(n, B, H)
    store._lens_base[sl] = store.lens[sl]
    store._base_len[sl] = [store.length] * n
    store.compact_all()


def prepare_page_start(store: FlexiKV) -> None:
    """After a step, when the next one starts a page: every layer's page start as that step
    would do it (the new page gets a slot per head, the head lists rebuilt at the next
    length, in one batch), so the next step is plain (replayable) and writes its token into
    the prepared slots. The page leaving the recent window stays kept until the layer's next
    re-ranking ranks it (`FlexiKV.hold_unranked`, on by default; off: stable heads drop it
    now unless it is in their top-K). Why: a page is then never dropped without being ranked
    as a candidate; the newest pages draw much attention, and spread re-ranking (each layer
    at its own phase of r) otherwise left a just-ranked-out page missing for up to r - 1
    steps: +1.68 % loss at r = 16 on moska-code-20m against +0.91 % deferred. Cost: at most
    ceil(r / block_size) pages more per stable head between re-rankings."""
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
    if store.hold_unranked:  # pages are dropped only at re-rankings
        keep = keep | store.kept
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
