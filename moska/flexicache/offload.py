"""One engine request's offloaded pages (`engine_hook.py`): the full K/V of its first `pages`
pages in host memory, and each head's kept pages in a page pool carved out of the block
cache. A pool block of the cache [N, bs, Hkv, D] holds Hkv page slots per layer; slot
`block * Hkv + j` is head j's slice of the block, and any head's page may use any slot (the
kernel reads them with `slot_heads=True`). Its blocks are the request's reserved blocks in
the block manager, so they are counted against the same budget as every other KV block.

Nothing here reads a device value on the host (a wait on CUDA): which slots are free is read
from the slot map itself (`assign_slots`, no host free list), fetch lists are padded to a
bound the host knows (a head's classes are fixed after the hand-off, so only a stable head
fetches, at most top-K pages; an unstable head keeps every page resident), and the pages are
read from the pinned host copy in place by `gather_rows` on CUDA (an index on the CPU). A
re-ranking step makes every offloaded request's kept pages of a layer resident at once
(`sync_layer`, batched over the requests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moska.flexicache import shared_slots
from moska.flexicache.config import FlexiCacheConfig
from moska.flexicache.host_pool import HostPool
from moska.flexicache.transfer import layer_chunk, to_device, write_host_pages


def pool_blocks_needed(
    cfg: FlexiCacheConfig, n_stable: list[int], hkv: int, pages: int, held: int = 0
) -> int:
    """Pool blocks for `pages` offloaded pages when layer l has `n_stable[l]` stable heads of
    `hkv`: an unstable head keeps all of them, a stable one at most top-K plus the sink pages
    plus `held` pages held until their next re-ranking (host arithmetic: the classes are
    read once, at the hand-off)."""
    per = min(pages, cfg.top_k_pages + cfg.sink_pages + held)
    return -(-max(s * per + (hkv - s) * pages for s in n_stable) // hkv)


def assign_slots(
    lslot: torch.Tensor,  # [R, Hkv, P] int64 pool-local slots (-1: not resident), in place
    keep: torch.Tensor,  # [R, Hkv, P] bool: pages kept now
    cap: torch.Tensor,  # [R] slots in each row's pool
    n_cap: int,  # >= every cap (host)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give the kept pages that are not resident slots, on the device. A page no longer kept
    keeps its slot (hysteresis) unless the needed pages outnumber the free slots: then the
    first such idle pages in (head, page) order are evicted, as many as are short. The i-th
    needed page in (head, page) order takes the i-th free slot. The pool holds every kept
    page (sized so at the hand-off). Returns (need [R, Hkv * P] bool, each page's new slot
    [R, Hkv * P] (valid where `need`), evicted pages [R])."""
    r = lslot.shape[0]
    flat = lslot.view(r, -1)
    keep_f = keep.reshape(r, -1)
    res = flat >= 0
    need, idle = keep_f & ~res, res & ~keep_f
    if n_cap == 0:
        return need, flat.clone(), need.new_zeros(r, dtype=torch.int64)
    in_pool = torch.arange(n_cap, device=flat.device)[None, :] < cap[:, None]

    def free() -> torch.Tensor:  # [R, n_cap] bool
        occ = torch.zeros(r, n_cap + 1, dtype=torch.int64, device=flat.device)
        occ.scatter_(1, torch.where(flat >= 0, flat, n_cap), 1)
        return in_pool & (occ[:, :n_cap] == 0)

    short = need.sum(1) - free().sum(1)
    evict = idle & (idle.cumsum(1) <= short[:, None])
    flat.masked_fill_(evict, -1)
    free_cum = free().cumsum(1)
    new = torch.searchsorted(free_cum, need.cumsum(1)).clamp(max=n_cap - 1)
    flat.copy_(torch.where(need, new, flat))
    return need, new, evict.sum(1)


def first_needed(need: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [R, limit]: the needed entries of each row first, in order; used [R, limit]:
    which of them are needed): a fetch list padded to a length the host knows."""
    order = (~need).to(torch.int8).argsort(dim=1, stable=True)[:, :limit]
    return order, need.gather(1, order)


def gather_pages(src: torch.Tensor, idx: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """src[idx] [n, row] on idx's device, for the `used` entries (the others hold anything).
    `src` [rows, row] may be pinned host memory: on CUDA read in place by `gather_rows` (no
    host gather, the indices stay on the device); on the CPU an index."""
    if src.device == idx.device:
        return src[idx.clamp(0, src.shape[0] - 1)]
    from moska.kernels.page_gather import gather_rows

    out = torch.empty(idx.numel(), *src.shape[1:], dtype=src.dtype, device=idx.device)
    dst = torch.where(used, torch.arange(idx.numel(), device=idx.device), -1)
    try:
        gather_rows(src, idx, out, dst)
    except (RuntimeError, ValueError):  # e.g. Triton refusing a host pointer: gather on the host
        return src[idx.cpu().clamp(0, src.shape[0] - 1)].to(idx.device)  # a wait
    return out


def host_row_offsets(hosts: list[torch.Tensor], layer: int):
    """(base, offsets): the host copy at the lowest address and, for each copy, the row
    (of bs * D elements) of `base` at which its layer `layer` starts, by address arithmetic
    (None when an address is not a whole number of rows apart)."""
    row_bytes = hosts[0].shape[-2] * hosts[0].shape[-1] * hosts[0].element_size()
    base = min(hosts, key=lambda t: t.data_ptr())
    esz = base.element_size()
    deltas = [t.data_ptr() + layer * t.stride(0) * esz - base.data_ptr() for t in hosts]
    if any(d % row_bytes for d in deltas):
        return base, None
    return base, [d // row_bytes for d in deltas]


def gather_shifted(
    base: torch.Tensor, shifts: list[int], src: torch.Tensor, used: torch.Tensor
) -> torch.Tensor | None:
    """[K * n, row]: rows src[k] + shifts[k] of pinned host `base` (rows of bs * D), read in
    place by one `gather_rows` on src's device (unused rows hold anything); None when the
    kernel refuses (e.g. Triton refusing a host pointer): the caller gathers per copy."""
    from moska.kernels.page_gather import gather_rows

    dev, row = src.device, base.shape[-2] * base.shape[-1]
    idx = (src + to_device(shifts, dev)[:, None]).view(-1)
    out = torch.empty(idx.numel(), row, dtype=base.dtype, device=dev)
    slot = torch.where(used.reshape(-1), torch.arange(idx.numel(), device=dev), -1)
    try:
        gather_rows(base.view(-1, row), idx, out, slot)
    except (RuntimeError, ValueError):
        return None
    return out


def gather_hosts(hosts: list[torch.Tensor], layer: int, src: torch.Tensor, used: torch.Tensor):
    """[R * n, row]: rows src[j] [n] of layer `layer` of hosts[j] [L, pages_j, Hkv, bs, D]
    (the rows of one layer: (page, head) pairs; the `used` ones, the others hold anything).
    Pinned host copies on a CUDA device are read in place by one `gather_rows` for all of
    them: row indices taken relative to the lowest copy's address (the copies are separate
    allocations), host arithmetic only (no per-request views or launches), unless an address
    is not a whole number of rows apart (then one gather per copy)."""
    row = hosts[0].shape[-2] * hosts[0].shape[-1]
    if hosts[0].device != src.device:
        base, offsets = host_row_offsets(hosts, layer)
        if offsets is not None and (out := gather_shifted(base, offsets, src, used)) is not None:
            return out
    flat = [t[layer].view(-1, row) for t in hosts]
    return torch.cat([gather_pages(h, s, u) for h, s, u in zip(flat, src, used)])


def write_slots(cache: torch.Tensor, hkv: int, dst: torch.Tensor, rows, used) -> None:
    """cache [N, bs, Hkv, D]: slot dst[i]'s page (block dst // Hkv, head slice dst % Hkv) =
    rows[i] [bs * D] where `used`. A list padded to a length the host knows: the unused
    entries write the first used entry's row again (the same value), or, none used, the
    first entry's slot its own content, so none changes anything else."""
    if not dst.numel():
        return
    _, bs, _, d = cache.shape
    rows = rows.view(-1, bs, d)
    first = used.to(torch.int64).argmax().view(1)
    some = used.any().view(1)
    d0 = torch.where(some, dst.gather(0, first), dst[:1])
    r0 = torch.where(
        some[:, None, None], rows.index_select(0, first), cache[d0 // hkv, :, d0 % hkv]
    )
    dst = torch.where(used, dst, d0)
    rows = torch.where(used[:, None, None], rows, r0.to(rows.dtype))
    cache[dst // hkv, :, dst % hkv] = rows.to(cache.dtype)


def _pages(cache, layers: slice, idx: torch.Tensor) -> torch.Tensor:
    """[l, len(idx), bs, Hkv, D]: blocks `idx` of the layers `layers` (a copy)."""
    if isinstance(cache, torch.Tensor):
        return cache[layers][:, idx]
    return torch.stack([cache[i][idx] for i in range(*layers.indices(len(cache)))])


def write_slots_layers(
    cache, layers: slice, hkv: int, dst: torch.Tensor, rows: torch.Tensor, used: torch.Tensor
) -> None:
    """`write_slots` for the layers `layers` at once: dst, used [l, n], rows [l, n, bs * D];
    cache a list of per-layer [N, bs, Hkv, D] tensors or one [L, N, bs, Hkv, D] tensor."""
    if not isinstance(cache, torch.Tensor):
        for j, layer in enumerate(range(*layers.indices(len(cache)))):
            write_slots(cache[layer], hkv, dst[j], rows[j], used[j])
        return
    if not dst.numel():
        return
    c = cache[layers]  # a view: [l, N, bs, Hkv, D]
    n_l, _, bs, _, d = c.shape
    rows = rows.view(n_l, -1, bs, d)
    lay = torch.arange(n_l, device=dst.device)
    first = used.to(torch.int64).argmax(1)  # [l]
    some = used.any(1)
    d0 = torch.where(some, dst.gather(1, first[:, None])[:, 0], dst[:, 0])
    r0 = torch.where(some[:, None, None], rows[lay, first], c[lay, d0 // hkv, :, d0 % hkv])
    dst = torch.where(used, dst, d0[:, None])
    rows = torch.where(used[..., None, None], rows, r0[:, None].to(rows.dtype))
    c[lay[:, None], dst // hkv, :, dst % hkv] = rows.to(c.dtype)


class Offload:
    def __init__(
        self,
        k_cache: list[torch.Tensor],  # per layer [N, bs, Hkv, D]
        v_cache: list[torch.Tensor],
        blocks: list[int],  # the request's blocks of pages 0..pages-1
        keep: torch.Tensor,  # [L, Hkv, pages] bool: pages each head keeps now
        pool: list[int],  # reserved blocks
        n_stable: list[int],  # stable heads per layer (fixed from now on)
        top_k: int,
        host_pool: HostPool | None = None,  # one buffer for every request's host copy
        shared: bool = False,  # one slot space for all layers (`shared_slots.py`)
    ) -> None:
        dev = k_cache[0].device
        n_layers, hkv, _ = keep.shape
        n_blocks, bs, _, d = k_cache[0].shape
        self.hkv, self.n_stable, self.top_k = hkv, n_stable, top_k
        self.shared, self.n_layers, self.n_blocks = shared, n_layers, n_blocks
        self.pages = 0
        self.pool: list[int] = []
        self.host_pool = host_pool
        self._ranges: dict[str, tuple[int, int]] = {}  # host_k / host_v: their pool pages
        # per (page, head) one contiguous row of bs * D: `gather_rows` reads it in place;
        # room for later hand-offs (`extend`) beyond the pages handed off now
        cap = len(blocks) + max(8, len(blocks) // 8)
        self.host_k = self._host("host_k", (n_layers, cap, hkv, bs, d), k_cache[0].dtype, dev)
        self.host_v = self._host("host_v", (n_layers, cap, hkv, bs, d), k_cache[0].dtype, dev)
        self.kmean = torch.empty(n_layers, hkv, 0, d, dtype=torch.float32, device=dev)
        self.lslot = torch.full((n_layers, hkv, 0), -1, dtype=torch.int64, device=dev)
        self.pool_t = torch.zeros(0, dtype=torch.int64, device=dev)  # local slot -> cache slot
        self.extend(k_cache, v_cache, blocks, keep, pool)

    def _host(self, name: str, shape: tuple[int, ...], dtype, dev) -> torch.Tensor:
        """[L, cap, Hkv, bs, D] host memory for `name`: pages of the host pool, or (no pool,
        or none free) its own allocation, pinned on CUDA."""
        hp = self.host_pool
        if hp is not None:
            got = hp.take(shape[1])
            if got is not None:
                self._ranges[name] = (got[0], shape[1])
                return got[1]
            hp.misses += 1
        return torch.empty(shape, dtype=dtype, pin_memory=dev.type == "cuda")

    def _give_back(self, name: str) -> None:
        rng = self._ranges.pop(name, None)
        if rng is not None and self.host_pool is not None:
            self.host_pool.give(*rng)

    def free(self) -> None:
        """The request is gone: its host pool pages go back (own allocations are dropped
        with this object)."""
        self._give_back("host_k")
        self._give_back("host_v")

    def host_bytes(self) -> int:
        return 2 * self.host_k.numel() * self.host_k.element_size()

    @property
    def capacity(self) -> int:
        """Slots of a layer (of every layer when they are shared)."""
        return len(self.pool) * self.hkv * (self.n_layers if self.shared else 1)

    def fetch_bound(self, layer: int) -> int:
        """Pages a re-ranking of `layer` can fetch at most: its stable heads' top-K (every
        other kept page is resident: sink pages, an unstable head's every page)."""
        return min(self.n_stable[layer] * min(self.top_k, self.pages), self.capacity)

    def extend(self, k_cache, v_cache, blocks: list[int], keep: torch.Tensor, pool: list[int]):
        """A hand-off (from no pages) or a later one: the pages that left the recent window
        since (`blocks`, pages `self.pages`.. on) join the host copy (its capacity doubles
        when full), the kept ones (`keep` [L, Hkv, all pages]: a stable head's top-K and sink
        pages, an unstable head's all) go to pool slots from the cache; `pool`: blocks
        reserved for the slots they need. Returns the pages evicted (a device count)."""
        dev = self.lslot.device
        n_layers, hkv, total = keep.shape
        old, new = self.pages, len(blocks)
        assert total == old + new, (total, old, new)
        pin = dev.type == "cuda"
        if total > self.host_k.shape[1]:  # the last extension's copies ended with its step
            cap = max(total, self.host_k.shape[1] * 5 // 4)
            for name in ("host_k", "host_v"):
                t = getattr(self, name)
                was = self._ranges.pop(name, None)
                grown = self._host(name, (n_layers, cap, *t.shape[2:]), t.dtype, dev)
                grown[:, :old].copy_(t[:, :old])
                setattr(self, name, grown)
                if was is not None and self.host_pool is not None:
                    self.host_pool.give(*was)
        d = self.kmean.shape[-1]
        self.kmean = torch.cat([self.kmean, self.kmean.new_empty(n_layers, hkv, new, d)], 2)
        self.lslot = torch.cat([self.lslot, self.lslot.new_full((n_layers, hkv, new), -1)], 2)
        self.pool += pool
        self.pages = total
        if self.shared:
            self.pool_t = shared_slots.global_slots(self.pool, hkv, n_layers, self.n_blocks, dev)
            return shared_slots.extend(self, k_cache, v_cache, blocks, keep, old, pin)
        self.pool_t = to_device([b * hkv + j for b in self.pool for j in range(hkv)], dev)
        caps = torch.full((n_layers,), self.capacity, dtype=torch.int64, device=dev)
        # the pages kept before are resident (the last re-ranking made them so): only the
        # new pages are placed, from the cache
        need, slot, evicted = assign_slots(self.lslot, keep, caps, self.capacity)
        order, used = first_needed(need, min(new * hkv, self.capacity))
        dst = self.pool_t[slot.gather(1, order)] if self.capacity else order
        row = ((order % total) - old).clamp(min=0) * hkv + order // total  # [L, limit]
        idx = to_device(blocks, dev)
        # layers in chunks (one cache [L, N, bs, Hkv, D]: a few ops per chunk instead of per
        # layer; one step of 14 later hand-offs took 100 ms on the H200 layer by layer)
        step = layer_chunk(k_cache, new)
        for l0 in range(0, n_layers, step):
            ls = slice(l0, min(l0 + step, n_layers))
            k, v = _pages(k_cache, ls, idx), _pages(v_cache, ls, idx)  # [l, new, bs, Hkv, D]
            self.kmean[ls, :, old:] = k.float().mean(2).transpose(1, 2)  # full pages
            for cache, host, x in ((k_cache, self.host_k, k), (v_cache, self.host_v, v)):
                x = x.transpose(2, 3).contiguous()  # [l, new, Hkv, bs, D]
                write_host_pages(host, l0, old, x, pin)  # stream order
                if order.shape[1]:
                    flat = x.view(x.shape[0], new * hkv, -1)
                    rows = flat.gather(1, row[ls, :, None].expand(-1, -1, flat.shape[-1]))
                    write_slots_layers(cache, ls, hkv, dst[ls], rows, used[ls])
        return evicted.sum()


class OffloadBatch:
    """The offloaded requests of one decode step: their slot maps (pool-local and in cache
    slots), padded to the longest ([R, L, Hkv, Pm], -1: not resident), built once per step.
    A re-ranking layer's `sync` updates them for the requests `due` (indices into `offs`)
    at once; `flush` writes the local maps back to each request once the step is done."""

    def __init__(self, offs: list[Offload], due: list[int]) -> None:
        self.offs, self.due = offs, due
        hkv = offs[0].hkv
        dev = offs[0].lslot.device
        self.pm = max(o.pages for o in offs)
        self.n_cap = max(o.capacity for o in offs)
        pad_pool = [F.pad(o.pool_t, (0, self.n_cap - o.capacity), value=o.pool[0] * hkv)
                    if o.pool else o.pool_t.new_zeros(self.n_cap) for o in offs]  # fmt: skip
        self.pool = torch.stack(pad_pool)  # [R, n_cap] local -> cache slot
        pages = to_device([o.pages for o in offs], dev)
        self.cols = torch.arange(self.pm, device=dev)[None, :] < pages[:, None]  # [R, Pm]
        self.lslot = torch.stack([F.pad(o.lslot, (0, self.pm - o.pages), value=-1) for o in offs])
        self.slot = self._global(self.pool, self.lslot)  # [R, L, Hkv, Pm]
        self.dirty = False
        if due:  # what every layer's `sync` of this step needs, on the device once
            self.ix = to_device(due, dev)
            self.cap = to_device([offs[i].capacity for i in due], dev)
            self.due_pool, self.due_cols = self.pool[self.ix], self.cols[self.ix]
            n_layers = offs[0].lslot.shape[0]
            self.limits = [[offs[i].fetch_bound(lay) for i in due] for lay in range(n_layers)]
            self.limits_t = to_device(torch.tensor(self.limits), dev)  # [L, len(due)]

    def _global(self, pool: torch.Tensor, lslot: torch.Tensor) -> torch.Tensor:
        """Cache slots of the pool-local slots `lslot` [R, ...] of the pools `pool` [R, n_cap]."""
        r = lslot.shape[0]
        g = pool.gather(1, lslot.reshape(r, -1).clamp(0, max(self.n_cap - 1, 0)))
        return torch.where(lslot >= 0, g.view(lslot.shape), -1)

    def sync(self, layer: int, keep: torch.Tensor, k_cache, v_cache):
        """A re-ranking of `layer` for the `due` requests: make the pages `keep` [len(due),
        Hkv, >= Pm] resident, fetching the missing ones from the host copies into free slots
        (evicting idle pages where the free slots are too few). Returns (pages fetched,
        pages evicted) as device counts."""
        offs = [self.offs[i] for i in self.due]
        if offs[0].shared:
            return shared_slots.sync(self, layer, keep, k_cache, v_cache)
        hkv, pm, ix = offs[0].hkv, self.pm, self.ix
        keep = keep[:, :, :pm] & self.due_cols[:, None, :]
        lslot = self.lslot[ix, layer]  # [len(due), Hkv, Pm], a copy
        need, slot, evicted = assign_slots(lslot, keep, self.cap, self.n_cap)
        self.lslot[ix, layer] = lslot
        self.slot[ix, layer] = self._global(self.due_pool, lslot)
        self.dirty = True
        limits = self.limits[layer]
        limit = max(limits)
        if not limit:
            return need.new_zeros((), dtype=torch.int64), evicted.sum()
        order, used = first_needed(need, limit)
        dev = order.device
        used = used & (torch.arange(limit, device=dev)[None, :] < self.limits_t[layer][:, None])
        dst = self.due_pool.gather(1, slot.gather(1, order))  # [len(due), limit] cache slots
        src = (order % pm) * hkv + order // pm  # rows of the host copy [pages * Hkv, bs * D]
        fetching = [i for i, n in enumerate(limits) if n]  # requests whose stable heads fetch
        sel = to_device(fetching, dev) if len(fetching) < len(limits) else None
        if sel is not None:
            dst, src, used = dst[sel], src[sel], used[sel]
        for cache, name in ((k_cache, "host_k"), (v_cache, "host_v")):
            hosts = [getattr(offs[i], name) for i in fetching]  # [L, cap, Hkv, bs, D]
            got = gather_hosts(hosts, layer, src, used)
            write_slots(cache[layer], hkv, dst.reshape(-1), got, used.reshape(-1))
        return used.sum(), evicted.sum()

    def flush(self) -> None:
        """Each request's pool-local slot map from the step's (after its re-rankings)."""
        if self.dirty:
            for i in self.due:
                o = self.offs[i]
                o.lslot.copy_(self.lslot[i, :, :, : o.pages])
            self.dirty = False
