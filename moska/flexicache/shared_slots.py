"""FlexiCache's page pool as one slot space for all layers (`FlexiCacheConfig.shared_slots`,
`--flexicache slots=shared`).

Why: a pool block of the cache [L, N, bs, Hkv, D] has `Hkv` slots in every layer. With one
slot space per layer (`slots=layer`; the default before session 18), a request's pool needs as many blocks as its worst layer
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
from moska.flexicache.transfer import to_device, write_host_pages


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
    """[len(pool) * L * Hkv]: each local slot's global slot id, (block, layer, head) order
    (built on the device: a list of every slot cost ~2 ms per later hand-off at B = 36)."""
    blocks = to_device(pool, dev)[:, None, None]
    layers = torch.arange(n_layers, device=dev)[None, :, None]
    heads = torch.arange(hkv, device=dev)[None, None, :]
    return ((layers * n_blocks + blocks) * hkv + heads).reshape(-1)


def layer_offsets(n_layers: int, n_blocks: int, hkv: int, dev) -> torch.Tensor:
    """[L]: what a layer adds to a table page's slot (block * Hkv + head) to make it global."""
    return torch.arange(n_layers, device=dev) * (n_blocks * hkv)


def extend(off, k_cache, v_cache, blocks, keep, old: int, pin: bool):
    """`extend` with one slot space for all layers: the new kept pages of every layer
    take free slots of any layer (one assignment for the request), read from the cache
    in one gather before one write (global slots of the flat cache)."""
    from moska.flexicache.offload import assign_slots, first_needed, write_slots
    from moska.flexicache.transfer import layer_chunk

    dev = off.lslot.device
    n_layers, hkv, total = keep.shape
    new = len(blocks)
    idx = to_device(blocks, dev)
    step = layer_chunk(k_cache, new)
    for l0 in range(0, n_layers, step):  # page means and host copies
        ls = slice(l0, min(l0 + step, n_layers))
        k, v = k_cache[ls][:, idx], v_cache[ls][:, idx]  # [l, new, bs, Hkv, D]
        off.kmean[ls, :, old:] = k.float().mean(2).transpose(1, 2)
        for host, x in ((off.host_k, k), (off.host_v, v)):
            x = x.transpose(2, 3).contiguous()  # [l, new, Hkv, bs, D]
            write_host_pages(host, l0, old, x, pin)
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


# fetch-list entries (pages) per call of `sync_all`: its temporaries (256 MiB of K rows of
# 16 x 128 bf16: 4 groups for B = 36 of the 8B bench; the value measured on the H200)
MAX_ENTRIES = 1 << 16


def sync_all(b, keep: torch.Tensor, k_cache, v_cache):
    """`sync` for every layer at once (a deferred re-ranking after the forward,
    `FlexiStep.rank_after`): `keep` [len(due), L, Hkv, >= Pm]. Every layer's dropped pages
    leave their slots first, then one slot pick over the request's whole slot space, one
    fetch list per group of requests (every layer's pages: rows of the whole host copy) read
    by one in-place gather per K and V, one write into the flat cache. Why: the layer-by-layer
    form issued ~70 small ops per layer (125-150 ms re-ranking steps at B = 36 on the H200).
    Freeing every layer's dropped slots before any pick needs no more room than the
    layer-by-layer order. Returns (fetched, evicted) device counts."""
    from moska.flexicache.offload import assign_slots, first_needed, write_slots

    offs = [b.offs[i] for i in b.due]
    hkv, pm, ix = offs[0].hkv, b.pm, b.ix
    r, n_layers = keep.shape[0], keep.shape[1]
    keep = keep[..., :pm] & b.due_cols[:, None, None, :]
    lall = b.lslot[ix]  # [R, L, Hkv, Pm], a copy
    drop = (lall >= 0) & ~keep
    lall.masked_fill_(drop, -1)
    need, slot, _ = assign_slots(
        lall.view(r, -1, pm), keep.reshape(r, -1, pm), b.cap, b.n_cap
    )  # need, slot [R, L * Hkv * Pm]
    b.lslot[ix] = lall
    b.slot[ix] = b._global(b.due_pool, lall)
    b.dirty = True
    evicted = drop.sum()
    fetched = need.new_zeros((), dtype=torch.int64)
    limits = [sum(b.limits[lay][j] for lay in range(n_layers)) for j in range(r)]
    dev = need.device
    # rows of a host copy [L, cap, Hkv, bs, D] per layer: cap * Hkv
    per_layer = [o.host_k.shape[1] * hkv for o in offs]
    for js in _groups(limits):
        lim = [limits[j] for j in js]
        limit = max(lim)
        sel = to_device(js, dev)
        order, used = first_needed(need[sel], limit)
        used = used & (torch.arange(limit, device=dev)[None, :] < to_device(lim, dev)[:, None])
        dst = b.due_pool[sel].gather(1, slot[sel].gather(1, order))  # global slots
        lay, rest = order // (hkv * pm), order % (hkv * pm)
        src = lay * to_device([per_layer[j] for j in js], dev)[:, None]
        src = src + (rest % pm) * hkv + rest // pm  # rows of the whole host copy
        for cache, name in ((k_cache, "host_k"), (v_cache, "host_v")):
            got = _gather_whole([getattr(offs[j], name) for j in js], src, used)
            write_slots(flat(cache), hkv, dst.reshape(-1), got, used.reshape(-1))
        fetched = fetched + used.sum()
    return fetched, evicted


def _groups(limits: list[int]) -> list[list[int]]:
    """Consecutive requests with a fetch bound whose padded lists hold at most
    `MAX_ENTRIES` pages together (requests that fetch nothing left out)."""
    groups: list[list[int]] = []
    cur: list[int] = []
    for j, n in enumerate(limits):
        if not n:
            continue
        if cur and max(n, *(limits[i] for i in cur)) * (len(cur) + 1) > MAX_ENTRIES:
            groups.append(cur)
            cur = []
        cur.append(j)
    return groups + [cur] if cur else groups


def _gather_whole(hosts: list[torch.Tensor], src: torch.Tensor, used: torch.Tensor):
    """[len(hosts) * n, bs * D]: rows src[j] of the whole host copy hosts[j]
    [L, cap, Hkv, bs, D] (one in-place `gather_rows` of pinned copies on CUDA)."""
    from moska.flexicache.offload import gather_pages, gather_shifted, host_row_offsets

    row = hosts[0].shape[-2] * hosts[0].shape[-1]
    if hosts[0].device != src.device:
        base, offsets = host_row_offsets(hosts, 0)
        if offsets is not None and (out := gather_shifted(base, offsets, src, used)) is not None:
            return out
    return torch.cat([gather_pages(h.view(-1, row), s, u) for h, s, u in zip(hosts, src, used)])
