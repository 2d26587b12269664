"""Host <-> device page copies of the FlexiCache page store (`store.py`), written so that a
decode step never waits on the device except where a re-ranking must know which pages to
fetch.

- `PageWriteBack`: a decode step writes its token only into the device pool (the page being
  written is always resident). When a page is full, one gather of the page from the pool
  and one asynchronous copy into pinned staging are queued; the host copy is updated from
  the staging later (the next page's write-back or the next fetch), when the copy has long
  finished. Before, each step copied its token into a strided slice of the host copy: a
  copy to a non-contiguous host tensor goes through pageable memory and waits for the device
  (two waits per layer and step).
- `fetch_in_place` / `fetch_host`: promoted pages from the host copy into pool slots, by a
  kernel reading the pinned host copy in place (`kernels/page_gather.py`, no host gather,
  indices stay on the device, padded with -1 to a length the host knows), or by a host
  gather into pinned staging and a copy up.
- `to_device`: host int lists to the device through pinned memory, without a stream sync
  (`torch.tensor(..., device="cuda")` copies from pageable memory and synchronizes).
- `FetchTimer`: the time spent fetching, by CUDA events (host clock on CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moska.kernels.page_gather import gather_rows


def to_device(
    values: list[int] | list[bool] | torch.Tensor,
    device: torch.device,
    dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """`values` as a tensor on `device`; from pinned memory (no stream sync) on CUDA."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def fetch_in_place(host_k, host_v, pool_k, pool_v, src, dst, check: bool) -> bool | None:
    """pool[dst[i]] = host[src[i]] (rows: whole pages; entries with dst[i] < 0 unused) by
    `gather_rows` reading the pinned host copy in place. `check`: compare a few fetched
    pages with the host copy (two waits). False: the kernel cannot read this host memory
    (nothing was copied, or wrongly); None: checked nothing (no page among the first)."""
    try:
        for host, pool in ((host_k, pool_k), (host_v, pool_v)):
            gather_rows(host, src, pool, dst)
        if check:
            s, d = src[:64].cpu(), dst[:64].cpu()
            s, d = s[d >= 0][:8], d[d >= 0][:8]
            if not len(d):
                return None
            return torch.equal(pool_k[d.to(pool_k.device)].cpu(), host_k[s])
    except (RuntimeError, ValueError):  # e.g. Triton refusing a host pointer
        return False
    return True


def fetch_host(host_k, host_v, pool_k, pool_v, flat: torch.Tensor, dst: torch.Tensor) -> None:
    """pool[dst[i]] = host[flat[i]] by one host gather into pinned staging per tensor and an
    async copy up (K's copy runs while the host gathers V)."""
    if not flat.numel():
        return
    pin = pool_k.device.type == "cuda"
    for host, pool in ((host_k, pool_k), (host_v, pool_v)):
        stage = torch.empty(len(flat), host.shape[1], dtype=host.dtype, pin_memory=pin)
        torch.index_select(host, 0, flat, out=stage)
        pool[dst] = stage.to(pool.device, non_blocking=True)


@dataclass
class _Pending:
    page: int
    k: torch.Tensor  # [B * H, bs, D] staging (pinned on CUDA)
    v: torch.Tensor
    done: torch.cuda.Event | None


class PageWriteBack:
    """Full pages' K/V from the device pool to the host copy, asynchronously; at most one
    page per layer in flight."""

    def __init__(self, host_k: torch.Tensor, host_v: torch.Tensor, device: torch.device) -> None:
        self.host_k, self.host_v = host_k, host_v  # [L, B, H, P, bs, D]
        self.device = device
        self.pending: dict[int, _Pending] = {}
        self.pages_written = 0

    def queue(self, layer: int, page: int, pool_k, pool_v, slots: torch.Tensor) -> None:
        """Queue the copy of `page` of every (row, head) from its pool slots `slots` [B * H]."""
        self.flush(layer)  # the previous page's copy finished a page of steps ago
        cuda = self.device.type == "cuda"
        staged = []
        for pool in (pool_k, pool_v):
            page_kv = pool[slots, :, 0]  # [B * H, bs, D], a device gather
            stage = torch.empty(page_kv.shape, dtype=page_kv.dtype, pin_memory=cuda)
            stage.copy_(page_kv, non_blocking=cuda)
            staged.append(stage)
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record()
        self.pending[layer] = _Pending(page, staged[0], staged[1], done)

    def flush(self, layer: int | None = None) -> None:
        """Put the queued pages of `layer` (None: every layer) into the host copy."""
        for lay in [layer] if layer is not None else list(self.pending):
            pend = self.pending.pop(lay, None)
            if pend is None:
                continue
            if pend.done is not None:
                pend.done.synchronize()
            _, b, h, _, bs, d = self.host_k.shape
            self.host_k[lay, :, :, pend.page].copy_(pend.k.view(b, h, bs, d))
            self.host_v[lay, :, :, pend.page].copy_(pend.v.view(b, h, bs, d))
            self.pages_written += b * h


class FetchTimer:
    """Seconds spent in fetches: on CUDA the stream time from each fetch's start to its last
    copy (idle gaps while the host gathers pages included: what the step waits for)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.host_s = 0.0

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def stop(self, start) -> None:
        if not self.cuda:
            self.host_s += time.perf_counter() - start
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.events.append((start, end))

    def seconds(self) -> float:
        if self.events:
            torch.cuda.synchronize(self.device)
        return self.host_s + sum(a.elapsed_time(b) for a, b in self.events) / 1e3

    def reset(self) -> None:
        self.events.clear()
        self.host_s = 0.0


HOST_WRITES = {"fallbacks": 0}  # in-place writes the kernel refused (per-layer copies instead)
# one in-place kernel write of a hand-off's host pages on CUDA (tested) instead of per-layer
# copies: off by default, the H200 run with it (session 17 call 2) had re-ranking steps ~4 ms
# slower than the one with copies (call 1); the bench's A/B rows `@copies` vs plain
HOST_WRITE_KERNEL = False


def write_host_pages(host: torch.Tensor, l0: int, old: int, x: torch.Tensor, pin: bool) -> None:
    """host[l0 : l0 + l, old : old + n] = x [l, n, Hkv, bs, D] (a hand-off's pages into
    a request's host copy [L, cap, Hkv, bs, D]). On CUDA into pinned memory: one
    `gather_rows` writing the rows in place over the bus (their indices made on the device),
    instead of one copy per layer (64 per later hand-off at 32 layers, K and V); per-layer
    copies where the kernel refuses the host pointer. Stream-ordered like the copies: later
    fetches on the stream read what it wrote."""
    n_l, n, hkv = x.shape[:3]
    if x.device == host.device:
        host[l0 : l0 + n_l, old : old + n].copy_(x)
        return
    if pin and HOST_WRITE_KERNEL and host.is_contiguous() and x.is_contiguous():
        dev, row = x.device, x.shape[-2] * x.shape[-1]
        lay = torch.arange(l0, l0 + n_l, device=dev)[:, None] * (host.shape[1] * hkv)
        dst = (lay + old * hkv + torch.arange(n * hkv, device=dev)[None, :]).view(-1)
        src = torch.arange(dst.numel(), device=dev)
        try:
            gather_rows(x.view(-1, row), src, host.view(-1, row), dst)
            return
        except (RuntimeError, ValueError):
            HOST_WRITES["fallbacks"] += 1
    for j in range(n_l):
        host[l0 + j, old : old + n].copy_(x[j], non_blocking=pin)


MOVE_BYTES = 1 << 28  # a hand-off's transient copies per chunk of layers (`layer_chunk`)


def layer_chunk(cache, new_pages: int) -> int:
    """Layers a hand-off moves at once: as many as keep its transient copies (K or V pages
    and their transposed copy, twice over) under `MOVE_BYTES`: 8 layers of a first hand-off
    of 254 pages (8B-shaped, bf16), every layer of a later one (8 pages: a few ops per
    request instead of a few per 8 layers). One layer at a time for per-layer caches."""
    if not isinstance(cache, torch.Tensor):
        return 1
    n_layers, _, bs, hkv, d = cache.shape
    per = 4 * max(new_pages, 1) * bs * hkv * d * cache.element_size()
    return max(1, min(n_layers, MOVE_BYTES // per))
