"""One host buffer (pinned on CUDA) for every hand-off's host copy (`offload.Offload`).

Each hand-off used to allocate its own pinned host tensors. Pinning is slow (the pages are
locked one by one) and PyTorch's caching host allocator rounds sizes up to a power of two,
so a step in which many requests hand off at once paid it for all of them: one hand-off
step took 4.6 s on the H200 (38 requests x 2 x 266 MB). The pool is allocated once, when the
engine starts (`FlexiCacheConfig.host_gib`, `--flexicache host=GiB`), and split into
ranges of whole pages (one page: every layer's and head's `block_size * head_dim` rows):
first fit, adjacent free ranges merged when a range comes back. Every copy is then a view
of one buffer, so `offload.gather_hosts` always reads the copies of many requests with one
gather (their row offsets are whole rows apart). A request that finds no range large enough
gets its own allocation as before (`misses` counts them).
"""

from __future__ import annotations

import bisect
import os

import torch


class HostPool:
    def __init__(
        self, pages: int, page_shape: tuple[int, int, int, int], dtype: torch.dtype, pin: bool
    ) -> None:
        """`pages` pages of `page_shape` (layers, kv heads, block size, head dim) each."""
        self.page_shape = page_shape
        self.page_elems = page_shape[0] * page_shape[1] * page_shape[2] * page_shape[3]
        self.pages = pages
        self.pin = pin
        self.buffer = torch.empty(pages * self.page_elems, dtype=dtype, pin_memory=pin)
        self._free: list[tuple[int, int]] = [(0, pages)] if pages else []  # (start, length)
        self.misses = 0  # allocations that did not fit in the pool
        self.peak_pages = 0
        self.used_pages = 0

    @classmethod
    def of_gib(
        cls, gib: float, page_shape: tuple[int, int, int, int], dtype: torch.dtype, pin: bool
    ) -> HostPool:
        """A pool of `gib` GiB (whole pages)."""
        esz = torch.empty((), dtype=dtype).element_size()
        per = page_shape[0] * page_shape[1] * page_shape[2] * page_shape[3] * esz
        return cls(int(gib * 2**30) // per, page_shape, dtype, pin)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def take(self, n: int) -> tuple[int, torch.Tensor] | None:
        """(start page, a [layers, n, kv heads, bs, D] view) of `n` free pages (first fit),
        or None when no free range is that long."""
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (start + n, length - n)
                self.used_pages += n
                self.peak_pages = max(self.peak_pages, self.used_pages)
                return start, self.view(start, n)
        return None

    def view(self, start: int, n: int) -> torch.Tensor:
        """Pages start..start+n-1 as a [layers, n, kv heads, bs, D] tensor."""
        layers, hkv, bs, d = self.page_shape
        flat = self.buffer[start * self.page_elems : (start + n) * self.page_elems]
        return flat.view(layers, n, hkv, bs, d)

    def give(self, start: int, n: int) -> None:
        """Return pages start..start+n-1 (merged with free neighbours)."""
        if n <= 0:
            return
        i = bisect.bisect(self._free, (start, n))
        prev = self._free[i - 1] if i else None
        nxt = self._free[i] if i < len(self._free) else None
        if (prev is not None and prev[0] + prev[1] > start) or (
            nxt is not None and start + n > nxt[0]
        ):
            raise ValueError(f"host pool pages {start}..{start + n - 1} are already free")
        if prev is not None and prev[0] + prev[1] == start:
            start, n, i = prev[0], prev[1] + n, i - 1
            del self._free[i]
        if i < len(self._free) and start + n == self._free[i][0]:
            n += self._free[i][1]
            del self._free[i]
        self._free.insert(i, (start, n))
        self.used_pages = self.pages - sum(length for _, length in self._free)

    def free_pages(self) -> int:
        return sum(length for _, length in self._free)

    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)

    def stats(self) -> dict[str, int]:
        return {
            "host_pool_pages": self.pages,
            "host_pool_bytes": self.nbytes,
            "host_pool_used_pages": self.used_pages,
            "host_pool_peak_pages": self.peak_pages,
            "host_pool_misses": self.misses,
        }


def make_host_pool(cfg, k_cache: list[torch.Tensor], device: torch.device) -> HostPool | None:
    """The engine's pool for `cfg.host_gib` over a KV cache of per-layer [N, bs, Hkv, D]
    tensors (None for 0). "auto" (-1): two host pages per cache block (twice the GPU KV
    bytes), at most half the host's memory."""
    if cfg.host_gib == 0:
        return None
    n, bs, hkv, d = k_cache[0].shape
    shape, dtype = (len(k_cache), hkv, bs, d), k_cache[0].dtype
    pin = torch.device(device).type == "cuda"
    if cfg.host_gib > 0:
        return HostPool.of_gib(cfg.host_gib, shape, dtype, pin)
    pages = 2 * 2 * n  # K and V: two of each block
    page_bytes = len(k_cache) * hkv * bs * d * k_cache[0].element_size()
    try:
        half = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        pages = min(pages, half // page_bytes)
    except (ValueError, OSError, AttributeError):  # no sysconf: the cache's size alone
        pass
    return HostPool(pages, shape, dtype, pin)
