"""FlexiCache in the engine's decode steps (`--flexicache`, EngineConfig.flexicache).

The runner asks `FlexiEngine.begin` for a `FlexiStep` on every eager decode-only step; the
attention backend then calls `FlexiStep.attend` per layer instead of the plain paged decode:
per request and KV head it re-ranks every R steps (by attention mass estimated from page
mean keys, exact mass, or Quest bounds),
classifies the head, and reads only the head's kept pages through `paged_decode_heads`.
Requests keep their state across steps by request id; `release` drops it.

Memory here is modeled: the kept pages are a per-head view of the ordinary paged cache,
whose blocks stay allocated. `stats()` reports the share of page reads that a head-aware
offload would keep on the GPU; the real offload (a compact GPU page pool over a host copy,
bytes measured) is `store.FlexiKV`, measured by `moska/bench/flexicache.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moska.flexicache import policy
from moska.flexicache.config import FlexiCacheConfig


@dataclass
class _RequestState:
    top: torch.Tensor  # [L, Hkv, K] int64, -1: not ranked yet
    stable: torch.Tensor  # [L, Hkv] bool
    steps: int = 0  # decode steps attended through FlexiCache


class FlexiEngine:
    def __init__(
        self,
        cfg: FlexiCacheConfig,
        num_layers: int,
        num_kv_heads: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self.device = device
        self.requests: dict[str, _RequestState] = {}
        # kept / total (request, layer, head) pages over every FlexiCache step, on the device
        self._kept = torch.zeros((), dtype=torch.int64, device=device)
        self._total = torch.zeros((), dtype=torch.int64, device=device)
        self._stable = torch.zeros((), dtype=torch.int64, device=device)
        self._heads = torch.zeros((), dtype=torch.int64, device=device)

    def begin(
        self,
        request_ids: list[str],
        block_tables: torch.Tensor,  # [B, P] int32 on the device
        seq_lens: list[int],
    ) -> FlexiStep:
        states = []
        for rid in request_ids:
            st = self.requests.get(rid)
            if st is None:
                top = torch.full(
                    (self.num_layers, self.num_kv_heads, self.cfg.top_k_pages),
                    -1,
                    dtype=torch.int64,
                    device=self.device,
                )
                st = self.requests[rid] = _RequestState(
                    top, torch.zeros_like(top[..., 0], dtype=torch.bool)
                )
            states.append(st)
        step = FlexiStep(self, states, block_tables, seq_lens)
        for st in states:
            st.steps += 1
        return step

    def release(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def stats(self) -> dict[str, float]:
        """kept_fraction: kept / all (request, layer, head) pages read at FlexiCache steps
        (the GPU-resident KV share a real offload would have; modeled here);
        stable_fraction: stable heads / heads at those steps."""
        total = max(int(self._total), 1)
        return {
            "kept_fraction": int(self._kept) / total,
            "stable_fraction": int(self._stable) / max(int(self._heads), 1),
        }


class FlexiStep:
    """One decode step's per-head page lists, built layer by layer."""

    def __init__(self, eng: FlexiEngine, states, block_tables: torch.Tensor, seq_lens) -> None:
        cfg, bs, dev = eng.cfg, eng.block_size, eng.device
        self.eng = eng
        self.states = states
        self.block_tables = block_tables.long()
        n_pages = [-(-s // bs) for s in seq_lens]
        self.due = [st.steps % cfg.rerank_interval == 0 for st in states]
        self.due_t = torch.tensor(self.due, device=dev)
        self.active = torch.tensor([cfg.long_enough(n) for n in n_pages], device=dev)
        self.n_pages = torch.tensor(n_pages, device=dev)
        self.seq_lens = torch.tensor(seq_lens, device=dev)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # [B, Hq, D]
        k_cache: torch.Tensor,  # [blocks, bs, Hkv, D]
        v_cache: torch.Tensor,
        decode_fn: Callable,
        sm_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eng, cfg = self.eng, self.eng.cfg
        p = self.block_tables.shape[1]
        top = torch.stack([st.top[layer] for st in self.states])  # [B, Hkv, K]
        stable = torch.stack([st.stable[layer] for st in self.states])  # [B, Hkv]
        if any(self.due):
            keys = k_cache[self.block_tables]  # [B, P, bs, Hkv, D]
            if cfg.rank_by == "bound":
                kmin, kmax = policy.page_summaries(keys, self.seq_lens)
                scores = policy.page_scores(q, kmin, kmax)
            elif cfg.rank_by == "centroid":
                kmean, count = policy.page_centroids(keys.permute(0, 3, 1, 2, 4), self.seq_lens)
                scores = policy.centroid_mass(q, kmean, count, sm_scale)
            else:
                keys = keys.permute(0, 3, 1, 2, 4)  # [B, Hkv, P, bs, D]
                scores = policy.page_mass(q, keys, self.seq_lens, sm_scale)
            cand = policy.candidates(self.n_pages, cfg.recent_pages, p, cfg.sink_pages)
            new_top, new_stable, _ = policy.rerank(scores, cand, top, cfg.threshold)
            top = torch.where(self.due_t[:, None, None], new_top, top)
            stable = torch.where(self.due_t[:, None], new_stable, stable)
            for i, st in enumerate(self.states):
                if self.due[i]:
                    st.top[layer], st.stable[layer] = top[i], stable[i]
        keep = policy.keep_mask(
            top, stable, self.active, self.n_pages, cfg.recent_pages, p, cfg.sink_pages
        )
        tables, lens = policy.head_lists(keep, self.block_tables, self.seq_lens, eng.block_size)
        eng._kept += keep.sum()
        eng._total += self.n_pages.sum() * keep.shape[1]
        eng._stable += (stable & self.active[:, None]).sum()
        eng._heads += stable.numel()
        return decode_fn(q, k_cache, v_cache, tables, lens, sm_scale)


def flexi_engine(config, num_kv_layers: int, num_kv_heads: int, device) -> FlexiEngine | None:
    """The runner's FlexiCache hook for an EngineConfig, None when `flexicache` is off."""
    cfg = config.flexicache_config
    if cfg is None:
        return None
    return FlexiEngine(cfg, num_kv_layers, num_kv_heads, config.block_size, torch.device(device))
