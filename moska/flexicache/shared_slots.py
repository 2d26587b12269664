"""FlexiCache's page pool as one slot space for all layers (`FlexiCacheConfig.shared_slots`,
`--flexicache slots=shared`).

Why: a pool block of the cache [L, N, bs, Hkv, D] has `Hkv` slots in every layer. With one
slot space per layer (the default), a request's pool needs as many blocks as its worst layer
needs slots: a layer whose heads are all unstable keeps every page, so the pool is as large
as the request (moska-code-20m, 2 KV heads: 2 of 4 requests could not hand off at all; the
8B bench: 144 pool blocks for 254 pages where the mean layer needs 83). Here any slot of any
layer's part of a pool block holds a page of any layer: slot ids are global,
`(layer * N + block) * Hkv + head`, and the per-head kernel reads the cache as one
[L * N, bs, Hkv, D] tensor (`flat`), so the pool is sized by the sum over layers.
A request's local slot s lies in pool block s // (L * Hkv), layer (s // Hkv) % L, head
s % Hkv (blocks added later append slots). Pages a re-ranking drops leave their slot at once
(no hysteresis): another layer's idle page could otherwise hold a slot that only its own
layer's re-ranking may free.
"""

from __future__ import annotations

import torch

from moska.flexicache.config import FlexiCacheConfig
from moska.flexicache.transfer import to_device


def blocks_needed(
    cfg: FlexiCacheConfig, n_stable: list[int], hkv: int, pages: int, held: int = 0
) -> int:
    """Pool blocks for `pages` offloaded pages of every layer, slots shared by the layers:
    the sum over layers of what `offload.pool_blocks_needed` takes the worst of."""
    per = min(pages, cfg.top_k_pages + cfg.sink_pages + held)
    need = sum(s * per + (hkv - s) * pages for s in n_stable)
    return -(-need // (hkv * len(n_stable)))


def flat(cache: torch.Tensor) -> torch.Tensor:
    """The cache [L, N, bs, Hkv, D] as [L * N, bs, Hkv, D] (a view): global slots' blocks."""
    return cache.view(-1, *cache.shape[2:])


def global_slots(pool: list[int], hkv: int, n_layers: int, n_blocks: int, dev) -> torch.Tensor:
    """[len(pool) * L * Hkv]: each local slot's global slot id."""
    return to_device(
        [
            (layer * n_blocks + b) * hkv + j
            for b in pool
            for layer in range(n_layers)
            for j in range(hkv)
        ],
        dev,
    )


def layer_offsets(n_layers: int, n_blocks: int, hkv: int, dev) -> torch.Tensor:
    """[L]: what a layer adds to a table page's slot (block * Hkv + head) to make it global."""
    return torch.arange(n_layers, device=dev) * (n_blocks * hkv)


def extend(off, k_cache, v_cache, blocks, keep, old: int, pin: bool):
    """`extend` with one slot space for all layers: the new kept pages of every layer
    take free slots of any layer (one assignment for the request), read from the cache
    in one gather before one write (global slots of the flat cache)."""
    from moska.flexicache.offload import LAYER_CHUNK, assign_slots, first_needed, write_slots

    dev = off.lslot.device
    n_layers, hkv, total = keep.shape
    new = len(blocks)
    idx = to_device(blocks, dev)
    for l0 in range(0, n_layers, LAYER_CHUNK):  # page means and host copies
        ls = slice(l0, min(l0 + LAYER_CHUNK, n_layers))
        k, v = k_cache[ls][:, idx], v_cache[ls][:, idx]  # [l, new, bs, Hkv, D]
        off.kmean[ls, :, old:] = k.float().mean(2).transpose(1, 2)
        for host, x in ((off.host_k, k), (off.host_v, v)):
            x = x.transpose(2, 3).contiguous()  # [l, new, Hkv, bs, D]
            for j in range(x.shape[0]):
                host[l0 + j, old:total].copy_(x[j], non_blocking=pin)
    idle = (off.lslot >= 0) & ~keep  # left their slots at once (no hysteresis)
    off.lslot.masked_fill_(idle, -1)
    need, slot, _ = assign_slots(
        off.lslot.view(1, n_layers * hkv, total),
        keep.reshape(1, n_layers * hkv, total),
        torch.full((1,), off.capacity, dtype=torch.int64, device=dev),
        off.capacity,
    )
    evicted = idle.sum()
    if not off.capacity:
        return evicted
    order, used = first_needed(need, min(new * hkv * n_layers, off.capacity))
    order, used = order[0], used[0]
    dst = off.pool_t[slot[0].gather(0, order)]  # global slots
    lay, head = order // (hkv * total), (order // total) % hkv
    page = ((order % total) - old).clamp(min=0, max=max(new - 1, 0))
    src = lay * off.n_blocks + idx[page]  # global blocks of the new pages
    for cache in (k_cache, v_cache):
        f = flat(cache)
        rows = f[src, :, head]  # [n, bs, D], read before any write
        write_slots(f, hkv, dst, rows.reshape(rows.shape[0], -1), used)
    return evicted


def sync(b, layer: int, keep: torch.Tensor, k_cache, v_cache):
    """`sync` with one slot space for all layers: the layer's dropped pages leave their
    slots, its needed pages take free slots of any layer (other layers' pages stay)."""
    from moska.flexicache.offload import assign_slots, first_needed, gather_hosts, write_slots

    offs = [b.offs[i] for i in b.due]
    hkv, pm, ix = offs[0].hkv, b.pm, b.ix
    keep = keep[:, :, :pm] & b.due_cols[:, None, :]
    lall = b.lslot[ix]  # [len(due), L, Hkv, Pm], a copy
    r = lall.shape[0]
    cur = lall[:, layer]
    drop = (cur >= 0) & ~keep
    lall[:, layer] = torch.where(drop, -1, cur)
    kall = lall >= 0
    kall[:, layer] = keep
    need, slot, _ = assign_slots(lall.view(r, -1, pm), kall.view(r, -1, pm), b.cap, b.n_cap)
    b.lslot[ix] = lall
    b.slot[ix] = b._global(b.due_pool, lall)
    b.dirty = True
    evicted = drop.sum()
    limits = b.limits[layer]
    limit = max(limits)
    if not limit:
        return need.new_zeros((), dtype=torch.int64), evicted
    order, used = first_needed(need, limit)  # this layer's pages only (others kept)
    dev = order.device
    used = used & (torch.arange(limit, device=dev)[None, :] < b.limits_t[layer][:, None])
    dst = b.due_pool.gather(1, slot.gather(1, order))  # global slots
    src = (order % pm) * hkv + (order // pm) % hkv  # rows of the layer's host copy
    fetching = [i for i, n in enumerate(limits) if n]
    sel = to_device(fetching, dev) if len(fetching) < len(limits) else None
    if sel is not None:
        dst, src, used = dst[sel], src[sel], used[sel]
    for cache, name in ((k_cache, "host_k"), (v_cache, "host_v")):
        hosts = [getattr(offs[i], name) for i in fetching]
        got = gather_hosts(hosts, layer, src, used)
        write_slots(flat(cache), hkv, dst.reshape(-1), got, used.reshape(-1))
    return used.sum(), evicted
