"""One engine request's offloaded pages (`engine_hook.py`): the full K/V of its first `pages`
pages in host memory, and each head's kept pages in a page pool carved out of the block
cache. A pool block of the cache [N, bs, Hkv, D] holds Hkv page slots per layer; slot
`block * Hkv + j` is head j's slice of the block, and any head's page may use any slot (the
kernel reads them with `slot_heads=True`). Its blocks are the request's reserved blocks in
the block manager, so they are counted against the same budget as every other KV block.
"""

from __future__ import annotations

import torch

from moska.flexicache.config import FlexiCacheConfig


def pool_blocks_needed(cfg: FlexiCacheConfig, stable: torch.Tensor, pages: int) -> int:
    """Pool blocks for `pages` offloaded pages under the head classes `stable` [L, Hkv]: an
    unstable head keeps all of them, a stable one at most top-K plus the sink pages."""
    hkv = stable.shape[1]
    per_head = torch.where(stable, min(pages, cfg.top_k_pages + cfg.sink_pages), pages)
    return -(-int(per_head.sum(1).max()) // hkv)


class Offload:
    def __init__(
        self,
        k_cache: list[torch.Tensor],  # per layer [N, bs, Hkv, D]
        v_cache: list[torch.Tensor],
        blocks: list[int],  # the request's blocks of pages 0..pages-1
        keep: torch.Tensor,  # [L, Hkv, pages] bool: pages each head keeps now
        pool: list[int],  # reserved blocks
    ) -> None:
        dev = k_cache[0].device
        n_layers, hkv, pages = keep.shape
        self.pages = pages
        self.hkv = hkv
        self.pool = pool
        pin = dev.type == "cuda"
        shape = (n_layers, pages, *k_cache[0].shape[1:])  # [L, pages, bs, Hkv, D]
        self.host_k = torch.empty(shape, dtype=k_cache[0].dtype, pin_memory=pin)
        self.host_v = torch.empty(shape, dtype=k_cache[0].dtype, pin_memory=pin)
        self.kmean = torch.empty(n_layers, hkv, pages, shape[-1], dtype=torch.float32, device=dev)
        self.slot = torch.full((n_layers, hkv, pages), -1, dtype=torch.int64, device=dev)
        slots = [b * hkv + j for b in pool for j in range(hkv)]
        self.free = [list(reversed(slots)) for _ in range(n_layers)]
        self.fetched_pages = 0
        self.evicted_pages = 0
        idx = torch.tensor(blocks, dtype=torch.int64, device=dev)
        for layer in range(n_layers):
            k, v = k_cache[layer][idx], v_cache[layer][idx]  # [pages, bs, Hkv, D]
            self.host_k[layer].copy_(k)  # synchronous: `sync` reads it on the host
            self.host_v[layer].copy_(v)
            self.kmean[layer] = k.float().mean(1).transpose(0, 1)  # full pages
            self._place(layer, keep[layer], k, v, k_cache, v_cache)
        self.fetched_pages = 0  # the hand-off's own copies are not fetches

    def host_bytes(self) -> int:
        return 2 * self.host_k.numel() * self.host_k.element_size()

    def extend(self, k_cache, v_cache, blocks: list[int], keep: torch.Tensor, pool: list[int]):
        """A later hand-off: the pages that left the recent window since (`blocks`, pages
        `self.pages`.. on) join the host copy (its capacity doubles when full), the kept ones
        (`keep` [L, Hkv, all pages]: a stable head's top-K and sink pages, an unstable
        head's all) go to pool slots; `pool`: blocks reserved for the slots they need."""
        dev = self.slot.device
        n_layers, hkv, total = keep.shape
        old, new = self.pages, len(blocks)
        assert total == old + new, (total, old, new)
        if total > self.host_k.shape[1]:
            cap = max(total, 2 * self.host_k.shape[1])
            pin = dev.type == "cuda"
            for name in ("host_k", "host_v"):
                t = getattr(self, name)
                grown = torch.empty((n_layers, cap, *t.shape[2:]), dtype=t.dtype, pin_memory=pin)
                grown[:, :old].copy_(t[:, :old])
                setattr(self, name, grown)
        d = self.kmean.shape[-1]
        self.kmean = torch.cat([self.kmean, self.kmean.new_empty(n_layers, hkv, new, d)], 2)
        self.slot = torch.cat([self.slot, self.slot.new_full((n_layers, hkv, new), -1)], 2)
        self.pool += pool
        slots = [b * hkv + j for b in pool for j in range(hkv)]
        for free in self.free:
            free[:0] = reversed(slots)
        self.pages = total
        idx = torch.tensor(blocks, dtype=torch.int64, device=dev)
        fetched = self.fetched_pages
        for layer in range(n_layers):
            k, v = k_cache[layer][idx], v_cache[layer][idx]  # [new, bs, Hkv, D]
            self.host_k[layer, old:total].copy_(k)  # synchronous: `sync` reads it on the host
            self.host_v[layer, old:total].copy_(v)
            self.kmean[layer, :, old:] = k.float().mean(1).transpose(0, 1)
            self._make_room(layer, keep[layer, :, :old], int(keep[layer, :, old:].sum()))
            self._place(layer, keep[layer, :, old:], k, v, k_cache, v_cache, first=old)
        self.fetched_pages = fetched  # the hand-off's own copies are not fetches

    def _place(self, layer: int, need: torch.Tensor, k, v, k_cache, v_cache, first=0) -> None:
        """Put the pages `need` [Hkv, n] (pages `first`.., not resident) into free slots,
        reading them from `k`/`v` [n, bs, Hkv, D] (the host copy or, at a hand-off, the
        cache)."""
        idx = need.nonzero()  # [n, 2] (head, page)
        n = idx.shape[0]
        if not n:
            return
        free = self.free[layer]
        assert len(free) >= n, "FlexiCache pool too small for the kept pages"
        new = torch.tensor(free[-n:], dtype=torch.int64, device=self.slot.device)
        del free[-n:]
        h, p = idx[:, 0], idx[:, 1]
        self.slot[layer, h, p + first] = new
        blk, pos = new // self.hkv, new % self.hkv
        hc, pc = h.to(k.device), p.to(k.device)
        k_cache[layer][blk, :, pos] = k[pc, :, hc].to(k_cache[layer].device, non_blocking=True)
        v_cache[layer][blk, :, pos] = v[pc, :, hc].to(v_cache[layer].device, non_blocking=True)
        self.fetched_pages += n

    def _make_room(self, layer: int, keep: torch.Tensor, n: int) -> None:
        """Evict resident pages not in `keep` [Hkv, pages] until `n` slots are free."""
        slot = self.slot[layer, :, : keep.shape[1]]
        short = n - len(self.free[layer])
        if short > 0:
            victims = ((slot >= 0) & ~keep).nonzero()[:short]
            h, p = victims[:, 0], victims[:, 1]
            self.free[layer].extend(slot[h, p].tolist())
            self.slot[layer, h, p] = -1
            self.evicted_pages += victims.shape[0]

    def sync(self, layer: int, keep: torch.Tensor, k_cache, v_cache) -> None:
        """Make the pages `keep` [Hkv, pages] resident: fetch the missing ones from the host
        copy into free slots; a resident page no longer kept keeps its slot until a fetch
        finds no free one (then it is evicted), so a page that comes back is not fetched."""
        slot = self.slot[layer]
        resident = slot >= 0
        need = keep & ~resident
        n = int(need.sum())
        if not n:
            return
        self._make_room(layer, keep, n)
        self._place(layer, need, self.host_k[layer], self.host_v[layer], k_cache, v_cache)
