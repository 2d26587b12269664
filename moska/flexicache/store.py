"""FlexiCache's page store for B sequences decoding together: the full KV in host memory
(pinned on CUDA), and on the device only a compact per-head page pool holding the pages
each head keeps. Real bytes: `gpu_bytes()` counts the tensors this store allocated on the
device (pool, page summaries, tables), `full_kv_bytes()` what a paged cache would hold.

The host copy holds every full page (the truth for offloaded pages); a decode token is
written only to the pool, where its page (always among the recent ones) is resident, and a
page reaches the host copy asynchronously once full (`transfer.PageWriteBack`; "mass"
ranking, which reads every key from the host copy, also writes each token there). When a
head's kept set changes (a re-ranking) its newly kept pages are fetched from the host copy:
`fetched_pages` counts those copies. A step that starts a new page only gives it a slot
per head (no copy, no wait on the device); the head lists are rebuilt only then and at
re-rankings. Other (plain) steps index by device tensors only (`plain_step`: CUDA-graphable).

Waits on the device (`host_reads` counts them): a re-ranking step reads one small tensor,
every layer's kept and idle counts after its last layer (`compact_all`); its allocation,
evictions and fetches are issued without reading anything back (`pool_sizing.py`: slots are
picked on the device, fetch lists padded to a bound the host knows, read by the in-place
kernel) as long as the layer's pool holds `keep_bound` pages, i.e. when heads that can turn
unstable already keep every page (the speed bench's forced classes); otherwise the layer
reads its counts once to grow its pool. A page start reads a layer's resident count only
when the host's bound leaves too few free slots; the host-gather fetch path (`zero_copy` off)
reads its index lists. Other steps read nothing back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import record_function

from moska.flexicache import policy
from moska.flexicache.config import FlexiCacheConfig
from moska.flexicache.plain_steps import PlainSteps
from moska.flexicache.pool_sizing import PoolSizing
from moska.flexicache.store_stats import StoreStats
from moska.flexicache.transfer import (
    FetchTimer,
    PageWriteBack,
    fetch_host,
    fetch_in_place,
    to_device,
)


class FlexiKV(PoolSizing, StoreStats, PlainSteps):
    def __init__(
        self,
        cfg: FlexiCacheConfig,
        *,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        max_pages: int,
        dtype: torch.dtype,
        device: torch.device | str,
        force_stable: torch.Tensor | None = None,  # [L, B, Hkv] bool: stable regardless
        hysteresis: bool = True,
        spare_pages: int = 0,
        pool_slack: float = 0.125,
        zero_copy: bool | None = None,
        host: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """hysteresis: a page a head stops keeping keeps its pool slot (not read) until a
        fetch needs the slot or a compaction has no room for it, so a page that comes back
        at a later re-ranking is not fetched again; False: its slot is freed at once.
        spare_pages: slots per head a compaction leaves beyond the kept pages and one new
        page, for dropped pages (device memory, counted in `gpu_bytes`).
        pool_slack: a layer's pool grows by at least this fraction of its size, and is
        compacted only when it holds more than twice that beyond what its heads keep (each
        resize copies the layer's whole pool; 0: exact sizes, a copy at most re-rankings).
        zero_copy: fetch by a kernel reading the pinned host copy in place
        (`kernels/page_gather.py`; None: on CUDA, checked once against a host gather and
        dropped for it if it fails); False: gather on the host, copy up.
        host: (K, V) host copies [L, B, H, P, bs, D] to use as given (not zeroed: the caller
        fills every page that is read), e.g. views of one pinned buffer reused by several
        stores: the caching host allocator rounds each pinned block up to a power of two and
        keeps freed blocks, so stores built one after another can exhaust host memory."""
        self.cfg = cfg
        self.device = torch.device(device)
        L, B, H, P, bs, D = num_layers, batch, num_kv_heads, max_pages, block_size, head_dim
        self.shape = (L, B, H, P, bs, D)
        self.block_size = bs
        pin = self.device.type == "cuda"
        if host is None:
            self.host_k = torch.zeros(L, B, H, P, bs, D, dtype=dtype, pin_memory=pin)
            self.host_v = torch.zeros(L, B, H, P, bs, D, dtype=dtype, pin_memory=pin)
        else:
            for t in host:
                if t.shape != self.shape or t.dtype != dtype or t.is_pinned() != pin:
                    raise ValueError(
                        f"host copy {tuple(t.shape)} {t.dtype} pinned={t.is_pinned()}: "
                        f"pass {self.shape} {dtype} pinned={pin}"
                    )
            self.host_k, self.host_v = host
        dev = self.device
        self.pool_k = [torch.zeros(0, bs, 1, D, dtype=dtype, device=dev) for _ in range(L)]
        self.pool_v = [torch.zeros(0, bs, 1, D, dtype=dtype, device=dev) for _ in range(L)]
        self.slot = torch.full((L, B, H, P), -1, dtype=torch.int64, device=dev)
        # page summaries on the device: mean keys ("centroid") or key min/max ("bound");
        # "mass" keeps none and reads the keys at re-rankings
        self.bound = cfg.rank_by == "bound"
        self.centroid = cfg.rank_by == "centroid"
        ps = P if self.bound else 0
        self.kmin = torch.zeros(L, B, H, ps, D, dtype=dtype, device=dev)
        self.kmax = torch.zeros(L, B, H, ps, D, dtype=dtype, device=dev)
        self.kmean = torch.zeros(L, B, H, P if self.centroid else 0, D, dtype=dtype, device=dev)
        self.rank_rows = 4  # rows whose keys a "mass" re-ranking brings to the device at once
        self.top = torch.full((L, B, H, cfg.top_k_pages), -1, dtype=torch.int64, device=dev)
        self.stable = torch.zeros(L, B, H, dtype=torch.bool, device=dev)
        self.tables = torch.zeros(L, B, H, P, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(L, B, H, dtype=torch.int32, device=dev)
        self.force_stable = None if force_stable is None else force_stable.to(dev)
        self._n_forced = [0] * L if force_stable is None else force_stable.sum((1, 2)).tolist()
        self._probe: dict[int, list[torch.Tensor | None]] = {}
        self.length = 0  # tokens per sequence, the current step's included
        self.step = -1  # decode steps begun, minus one
        self.hysteresis = hysteresis
        self.spare_pages = spare_pages if hysteresis else 0
        self.kept = torch.zeros(L, B, H, P, dtype=torch.bool, device=dev)  # read pages
        self.dropped_step = torch.full((L, B, H, P), -(2**30), dtype=torch.int64, device=dev)
        self.pool_slack = pool_slack
        self.pool_version = 0
        self.zero_copy = self.device.type == "cuda" if zero_copy is None else zero_copy
        self._zero_copy_checked = zero_copy is not None
        # counters on the device (read by the properties): pages fetched; fetches of pages
        # dropped at the previous re-ranking or later; pages kept again while still in their
        # slot (hysteresis); slots taken from pages (dropped ones, or under no hysteresis)
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        self._fetched, self._refetched, self._reused, self._evicted = (zero.clone() for _ in "abcd")
        self._resident = torch.zeros(L, dtype=torch.int64, device=dev)  # per layer
        self._peak = zero.clone()
        self._res_hi = [0] * L  # per layer: resident pages at most (host bound)
        self._kept_hi = [B * H * P] * L  # ... kept pages at most (until `compact_all`)
        self._res_exact = [True] * L  # ... exactly
        self._synced = [False] * L
        self._ranked_now: list[int] = []
        self._fetch_masks: list[torch.Tensor] = []
        self.host_reads = 0  # device values read on the host (waits on CUDA)
        self.on_read: Callable[[], None] | None = None  # called before each (bench probes)
        self._compact_due = False
        self.time_fetch = False  # time the fetches (`fetch_seconds`): CUDA events / host clock
        self._timer = FetchTimer(self.device)
        self.write_back = PageWriteBack(self.host_k, self.host_v, self.device)
        self._n_pages = self._active = self._seq = torch.zeros(0)
        self._per_step: dict[str, object] = {}  # masks every layer of a step shares
        # the step's position on the device (page, slot in it) and, per layer, the head
        # lists' lengths at their last rebuild and the tokens added since (plain steps)
        self._page_pos = torch.zeros(1, dtype=torch.int64, device=dev)
        self._slot_pos = torch.zeros((), dtype=torch.int64, device=dev)
        self._lens_base = torch.zeros(L, B, H, dtype=torch.int32, device=dev)
        self._since = torch.zeros(L, 1, 1, dtype=torch.int32, device=dev)
        self._base_len = [0] * L
        self.defer_write_back = False  # full pages reach the host at `queue_write_backs`
        self.deferred_rerank = False  # re-rank after the step (`finish_step`, `deferred.py`)
        self.rerank_spread = False  # deferred: a slice of layers after each step (`deferred`)
        self.hold_unranked = True  # deferred: a page leaving the recent window stays kept
        # until its layer's next re-ranking (`deferred.prepare_page_start`)
        self._q_buf: torch.Tensor | None = None
        self._sm = head_dim**-0.5
        self._page_ready = -1  # see `deferred.prepare_page_start`

    # ---- prefill ----
    def write_prompt(self, layer: int, row: int, k: torch.Tensor, v: torch.Tensor, q_last):
        """One sequence's prompt K/V [T, Hkv, D] (host copy and summaries) and its last
        query [Hq, D]: the ranking the first decode step's ranking is compared with."""
        _, _, H, _, bs, D = self.shape
        t = k.shape[0]
        n = -(-t // bs)
        pad = n * bs - t
        for host, x in ((self.host_k, k), (self.host_v, v)):
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).view(n, bs, H, D)
            host[layer, row, :, :n].copy_(x.permute(2, 0, 1, 3))
        if self.centroid:
            padded = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(1, n, bs, H, D)
            kmean, _ = policy.page_centroids(
                padded.permute(0, 3, 1, 2, 4), torch.tensor([t], device=k.device)
            )
            self.kmean[layer, row, :, :n] = kmean[0].to(self.kmean.dtype)
        if self.bound:
            padded = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(1, n, bs, H, D)
            kmin, kmax = policy.page_summaries(padded, torch.tensor([t], device=k.device))
            self.kmin[layer, row, :, :n] = kmin[0].to(self.kmin.dtype)
            self.kmax[layer, row, :, :n] = kmax[0].to(self.kmax.dtype)
        self._probe.setdefault(layer, [None] * self.shape[1])[row] = q_last
        self.length = t

    def finish_prompts(self, sm_scale: float | None = None) -> None:
        """Rank every head once with its sequence's last prompt query."""
        sm = self.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        _, B, _, P, bs, _ = self.shape
        n_pages = torch.full((B,), -(-self.length // bs), device=self.device)
        cand = policy.candidates(n_pages, self.cfg.recent_pages, P, self.cfg.sink_pages)
        self._per_step = {}  # the prompt's length
        for layer, qs in self._probe.items():
            assert all(q is not None for q in qs), "write_prompt every row of every layer"
            q = torch.stack(qs)  # type: ignore[arg-type]
            scores = self._scores(layer, q, sm)
            self.top[layer] = policy.rerank(scores, cand, self.top[layer], 2.0)[0]
        self._probe.clear()

    # ---- decode ----
    def begin_step(self) -> None:
        """Before each decode forward: one more token per sequence."""
        if self._compact_due:  # the last re-ranking step did not reach the last layer
            self._compact_due = False
            self.compact_all()
        self.length += 1
        self.step += 1
        _, B, _, P, bs, _ = self.shape
        if self.length > P * bs:
            raise ValueError(f"sequence longer than max_pages * block_size ({self.length})")
        n = -(-self.length // bs)
        self._n_pages = torch.full((B,), n, device=self.device)
        self._active = torch.full((B,), self.cfg.long_enough(n), device=self.device)
        self._seq = torch.full((B,), self.length, device=self.device)
        self._per_step = {}
        self._page_pos.fill_((self.length - 1) // bs)
        self._slot_pos.fill_((self.length - 1) % bs)
        since = [self.length - b for b in self._base_len]
        if len(set(since)) == 1:
            self._since.fill_(since[0])
        else:
            self._since.copy_(to_device(since, self.device, torch.int32).view(-1, 1, 1))

    def _shared(self, name: str, page: int = 0):
        """This step's candidate pages ("cand"), `policy.window_masks` ("windows"), page
        count bias ("bias"), `policy.last_page_pad` ("pad") or [B * H * P] mask of the pages
        other than `page` ("not_fresh"), computed at its first layer: the same for every
        layer."""
        got = self._per_step.get(name)
        if got is None:
            _, B, _, P, bs, _ = self.shape
            cfg = self.cfg
            if name == "cand":
                got = policy.candidates(self._n_pages, cfg.recent_pages, P, cfg.sink_pages)
            elif name == "not_fresh":
                got = torch.arange(B * self.shape[2] * P, device=self.device) % P != page
            elif name == "pad":
                got = policy.last_page_pad(self._seq, bs)
            elif name == "windows":
                got = policy.window_masks(self._n_pages, cfg.recent_pages, P, cfg.sink_pages)
            else:
                first = torch.arange(P, device=self.device) * bs
                count = (self.length - first).clamp(0, bs)[None, :].expand(B, P)
                got = policy.count_bias(count)
            self._per_step[name] = got
        return got

    def attend(self, layer, q, k, v, decode_fn, sm_scale: float) -> torch.Tensor:
        """q [B, Hq, D], the new token's k/v [B, Hkv, D] -> o [B, Hq, D] through
        `decode_fn` (`paged_decode_heads` or its reference) over the kept pages."""
        bs, cfg = self.block_size, self.cfg
        pos = self.length - 1
        p, s = pos // bs, pos % bs
        if not (self.bound or self.centroid):  # "mass" reads every key from the host copy
            self.host_k[layer, :, :, p, s].copy_(k)
            self.host_v[layer, :, :, p, s].copy_(v)
        elif self.bound and s == 0:
            self.kmin[layer, :, :, p] = k
            self.kmax[layer, :, :, p] = k
        elif self.bound:
            torch.minimum(self.kmin[layer, :, :, p], k, out=self.kmin[layer, :, :, p])
            torch.maximum(self.kmax[layer, :, :, p], k, out=self.kmax[layer, :, :, p])
        rerank = self.step % cfg.rerank_interval == 0 and not (self.deferred_rerank and self.step)
        if self.deferred_rerank:  # the queries `deferred.apply_rerank` ranks with
            if self._q_buf is None:
                self._q_buf = q.new_zeros(self.shape[0], *q.shape)
            self._q_buf[layer].copy_(q)
            self._sm = sm_scale
        if rerank:
            with record_function("flexi.rank"):
                scores = self._scores(layer, q, sm_scale)
                top, stable, _ = policy.rerank(
                    scores, self._shared("cand"), self.top[layer], cfg.threshold
                )
                if self.force_stable is not None:
                    stable = stable | self.force_stable[layer]
                self.top[layer], self.stable[layer] = top, stable
        if rerank or (s == 0 and self._page_ready != self.length) or self.step == 0:
            keep = policy.keep_mask_windows(
                self.top[layer], self.stable[layer], self._active, self._shared("windows")
            )
            if rerank or self.step == 0:
                with record_function("flexi.sync"):
                    self._sync(layer, keep, fresh=p if s == 0 else None)
                self._compact_due = True
            else:  # a new page: the only page newly kept (kept pages are candidates)
                with record_function("flexi.start_page"):
                    self._start_page(layer, keep, p)
            with record_function("flexi.lists"):
                self.tables[layer], self.lens[layer] = policy.head_lists(
                    keep, self.slot[layer], self._seq, bs, self._shared("pad")
                )
            self._base_len[layer] = self.length
            self._lens_base[layer] = self.lens[layer]
        else:  # lens as at the last rebuild plus the tokens since: replays give the same
            torch.add(self._lens_base[layer], self._since[layer], out=self.lens[layer])
        cur = self._write_token(layer, k, v)
        if s == bs - 1 and (self.bound or self.centroid) and not self.defer_write_back:
            self.write_back.queue(layer, p, self.pool_k[layer], self.pool_v[layer], cur)
        o, _ = decode_fn(
            q,
            self.pool_k[layer],
            self.pool_v[layer],
            self.tables[layer],
            self.lens[layer],
            sm_scale,
        )
        if self._compact_due and layer == self.shape[0] - 1:  # after the step's last re-ranking
            self._compact_due = False
            with record_function("flexi.compact_all"):
                self.compact_all()
        return o

    def _relist(self, layer: int) -> None:
        """The layer's head lists again, after its slots moved (a compaction)."""
        bs = self.block_size
        self.tables[layer], self.lens[layer] = policy.head_lists(
            self.kept[layer], self.slot[layer], self._seq, bs, self._shared("pad")
        )
        self._base_len[layer] = self.length
        self._lens_base[layer] = self.lens[layer]

    def _scores(self, layer: int, q: torch.Tensor, sm_scale: float) -> torch.Tensor:
        """[B, Hkv, P] page scores of the current queries: from the device summaries (mean
        keys, or Quest bounds), or the exact attention mass over every key, the host
        copy's, `rank_rows` rows at a time (a device transfer of the layer's keys)."""
        if self.bound:
            return policy.page_scores(q, self.kmin[layer], self.kmax[layer])
        if self.centroid:
            bias = self._shared("bias")
            return policy.centroid_mass_biased(q, self.kmean[layer], bias, sm_scale)
        n = torch.full((q.shape[0],), self.length, device=self.device)
        parts = []
        for r0 in range(0, q.shape[0], self.rank_rows):
            r1 = min(r0 + self.rank_rows, q.shape[0])
            keys = self.host_k[layer, r0:r1].to(self.device, non_blocking=True)
            parts.append(policy.page_mass(q[r0:r1], keys, n[r0:r1], sm_scale))
        return torch.cat(parts)

    def _fetch(self, layer, need: torch.Tensor, new: torch.Tensor, fresh: int | None, limit: int):
        """Copy the pages `need` [B, H, P] (page `fresh`, started this step, holds nothing
        yet: not copied) from the host copy into their new slots `new` [B * H * P]: index
        lists of `limit` (>= the pages copied) entries, the unused ones -1, on the device."""
        with record_function("flexi.fetch"):
            timer = self._timer.start() if self.time_fetch else None
            *_, bs, D = self.shape
            copy = need.reshape(-1)
            if fresh is not None:
                copy = copy & self._shared("not_fresh", fresh)
            self._fetch_masks.append(copy)  # counted at `compact_all` (`_account_ranked`)
            limit = min(limit, copy.numel())
            # copied pages first, in page order
            order = copy.to(torch.int8).argsort(descending=True, stable=True)[:limit]
            used = copy[order]
            src = torch.where(used, order, -1)  # rows of the layer's host copy [B * H * P, ...]
            dst = torch.where(used, new[order], -1)
            self.write_back.flush(layer)  # pages written back are in the host copy
            hk, hv = (t[layer].view(-1, bs * D) for t in (self.host_k, self.host_v))
            pk, pv = (t[layer].view(-1, bs * D) for t in (self.pool_k, self.pool_v))
            if self.zero_copy and limit:
                check = not self._zero_copy_checked
                self.host_reads += 2 * check
                ok = fetch_in_place(hk, hv, pk, pv, src, dst, check=check)
                self._zero_copy_checked = check is False or ok is not None
                self.zero_copy = ok is not False
            if not self.zero_copy and limit:
                src_h, dst_h = self._read(torch.stack([src, dst]))
                pairs = [(a, b) for a, b in zip(src_h, dst_h) if b >= 0]
                if pairs:
                    src_t = torch.tensor([a for a, _ in pairs], dtype=torch.int64)
                    fetch_host(hk, hv, pk, pv, src_t, to_device([b for _, b in pairs], self.device))
            if timer is not None:
                self._timer.stop(timer)
