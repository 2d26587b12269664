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

    def _place(self, layer: int, need: torch.Tensor, k, v, k_cache, v_cache) -> None:
        """Put the pages `need` [Hkv, pages] (not resident) into free slots, reading them
        from `k`/`v` [pages, bs, Hkv, D] (the host copy or, at the hand-off, the cache)."""
        idx = need.nonzero()  # [n, 2] (head, page)
        n = idx.shape[0]
        if not n:
            return
        free = self.free[layer]
        assert len(free) >= n, "FlexiCache pool too small for the kept pages"
        new = torch.tensor(free[-n:], dtype=torch.int64, device=self.slot.device)
        del free[-n:]
        h, p = idx[:, 0], idx[:, 1]
        self.slot[layer, h, p] = new
        blk, pos = new // self.hkv, new % self.hkv
        hc, pc = h.to(k.device), p.to(k.device)
        k_cache[layer][blk, :, pos] = k[pc, :, hc].to(k_cache[layer].device, non_blocking=True)
        v_cache[layer][blk, :, pos] = v[pc, :, hc].to(v_cache[layer].device, non_blocking=True)
        self.fetched_pages += n

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
        short = n - len(self.free[layer])
        if short > 0:
            victims = (resident & ~keep).nonzero()[:short]
            h, p = victims[:, 0], victims[:, 1]
            self.free[layer].extend(slot[h, p].tolist())
            slot[h, p] = -1
            self.evicted_pages += victims.shape[0]
        self._place(layer, need, self.host_k[layer], self.host_v[layer], k_cache, v_cache)
