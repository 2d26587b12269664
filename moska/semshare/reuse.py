"""The engine's side of SemShareKV: plan a request's reuse on admission, blend its prefill
before the step's forward, and store prompts computed in full as references.

Hook (three calls from `engine/llm_engine.py`, nothing else in the engine knows of it):
- `plan(prompt_ids)` when a request is added: LSH candidate -> token matching -> a
  `ReusePlan` (or None). A planned request's KV is private (`Request.private_kv`): its
  approximate KV never enters the prefix cache; its leading blocks may be other requests'
  exact KV from it (an exact prefix), and the blend starts after them.
- `prefill(scheduled, block_table)` after `schedule()`, before the runner's forward: for
  each scheduled prompt range [start, end) of a planned request, `blend_prefill` computes
  [start, end - 1) into the blocks the scheduler just allocated, then the item is narrowed
  to its last token ([end - 1, end)), which the ordinary forward computes (and samples
  from, when it ends the prompt). The scheduler's counts stay consistent:
  `num_computed_tokens + num_new_tokens` is unchanged. `finish_in_blend`: when every item
  of the step ends a planned prompt, the blend computes [start, end) and the item carries
  the last token's hidden state (`semantic_hidden`), which the runner samples from without
  a forward (a decode step's pass over the weights, ~4 ms at 8B dims).
- `record(scheduled, block_table)` right after the forward is queued: a request without a
  plan whose prompt was completed by this step has its prompt KV copied (queued on the
  stream, no wait) and enters the store once its LSH signatures reach the host (`flush`:
  at the next `record` when they have, at the latest at the next `plan`), so storing a
  prompt adds no host sync to its own time to first token.
- `attach(block_manager)` once the engine has its block manager: references become blocks of
  the paged cache and planned requests take the reference's blocks that they would copy
  unchanged instead of fresh ones (`sharing.py`: the KV memory a request saves).
On CUDA the engine calls `warm_up` once: every row bucket's layers past the boundary are
captured as a CUDA graph (`graphs.py`; with `cuda_graphs` off, every bucket's matmul shapes
are seen), so a blend neither launches them one by one nor picks an algorithm on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moska.semshare import sharing
from moska.semshare.blend import blend_prefill, row_bucket
from moska.semshare.config import SemShareConfig
from moska.semshare.graphs import BlendGraphs
from moska.semshare.lsh import LSHIndex
from moska.semshare.matching import TokenMatch, inverse_norms, match_tokens, token_features
from moska.semshare.row_attention import slots_of, warm_row_kernel
from moska.semshare.store import Reference, ReferenceStore, prompt_key


@dataclass(eq=False)
class ReusePlan:
    """Which reference a prompt reuses and where each of its tokens comes from."""

    ref: Reference
    # [num_prompt_tokens] int64 on the host: reference position or -1 (blend_prefill counts
    # the matches there, so a blend waits on no step in flight, and copies it non-blocking)
    ref_pos: torch.Tensor
    score: float  # share of the prompt's tokens that collided with the reference (LSH)
    ids: torch.Tensor | None = None  # [num_prompt_tokens] int64 on the host: the prompt
    # table index -> reference block the request takes as it is (`sharing.shared_map`)
    shared: dict[int, int] = field(default_factory=dict)
    # the blocks it could take, sharing on or off: their tokens are never kept past the
    # boundary (`blend_prefill`'s `fixed`), so that sharing and copying keep the same rows
    fixed: dict[int, int] = field(default_factory=dict)
    owner: sharing.BlockReferences | None = None  # pins the reference while it is blended
    pinned: str | None = None  # the request id holding the pin, while it holds one

    @property
    def num_matched(self) -> int:
        return int((self.ref_pos >= 0).sum())

    def shared_blocks(self, request: Any) -> dict[int, int] | None:
        """`Request.shared_blocks`: read by the block manager at each allocation; pins the
        reference while the prompt is being computed."""
        return None if self.owner is None else self.owner.pin(self, request)


@dataclass
class ReuseStats:
    planned: int = 0  # requests that got a plan
    reused_tokens: int = 0  # prompt tokens whose KV (past the first layers) was reused
    blended_tokens: int = 0  # prompt tokens computed by blend_prefill (reused or not)
    stored: int = 0  # prompts stored as references
    shared_blocks: int = 0  # blocks planned prompts took from their reference (no copy)
    prompt_blocks: int = 0  # blocks of those prompts (all of their table at completion)


class SemanticReuse:
    """Reference store + matcher + blended prefill for one engine (one model, one cache)."""

    def __init__(self, config: SemShareConfig, model, cache) -> None:
        self.config = config
        self.model = model
        self.cache = cache
        dim = 2 * model.config.hidden_size  # token_features: (embedding, context)
        lsh = LSHIndex(dim, config.lsh_bands, config.lsh_rows, config.seed)
        self.store = ReferenceStore(config.store_bytes, lsh)
        self.stats = ReuseStats()
        self._inv_norm: torch.Tensor | None = None  # [V] of the embedding, on first use
        # references recorded, waiting for their LSH signatures (host tensor, CUDA event)
        self._pending: list[tuple[Reference, torch.Tensor, torch.cuda.Event | None]] = []
        # rows past the boundary are bucketed on CUDA only (cuBLAS's per-shape host cost)
        self.granule = config.row_granule if cache.k.is_cuda else 1
        # the layers past the boundary as CUDA graphs (`warm_up` captures them), or None
        self.graphs: BlendGraphs | None = None
        # plan: queue the token matching on the shortlist's most voted reference before its
        # exact LSH score is known (`plan`); on CUDA only, where it overlaps the host's
        # scoring (a wrong guess costs one matching on the device, no host time); on the
        # CPU it would run in line, a wrong guess costing a whole matching
        self.speculate = cache.k.is_cuda
        self.blocks: sharing.BlockReferences | None = None  # `attach`: held as cache blocks

    @classmethod
    def for_engine(cls, engine_config, runner) -> SemanticReuse:
        """From `EngineConfig`'s semantic_* fields and the runner's model and cache."""
        c = engine_config
        cfg = SemShareConfig(
            threshold=c.semantic_reuse_threshold,
            recompute_fraction=c.semantic_recompute_fraction,
            recompute_layers=c.semantic_recompute_layers,
            store_bytes=c.semantic_store_mb << 20,
            seed=c.seed,
            cuda_graphs=getattr(c, "semantic_cuda_graphs", True),
        )
        reuse = cls(cfg, runner.model, runner.cache)
        reuse.warm_up(c.max_num_batched_tokens)
        return reuse

    def attach(self, block_manager) -> None:
        """Keep references as blocks of the engine's paged cache and let planned requests
        take them (`sharing.BlockReferences`)."""
        self.blocks = sharing.BlockReferences(block_manager, self.cache, self.store)

    @torch.inference_mode()
    def warm_up(self, max_rows: int) -> int:
        """Before any request (it writes slot 0 of the cache): with `cuda_graphs`, capture the
        layers past the boundary at every row bucket up to `max_rows` (`graphs.py`); else run
        each distinct layer once at every bucket (random rows, attention skipped, nothing
        written), so each bucket's matmul shapes have their cuBLAS algorithm (and kernel)
        before any request; on CUDA the row attention kernel's variants are compiled too
        (`warm_row_kernel`). Returns the buckets visited (0 when bucketing is off)."""
        if self.granule <= 1:
            return 0
        cfg = self.model.config
        warm_row_kernel(self.cache, cfg.num_heads, cfg.sm_scale, max_rows)
        if self.config.cuda_graphs and self.cache.k.is_cuda:
            buckets = row_buckets(max_rows, self.granule)
            first = self.config.recompute_layers
            if first < len(self.model.layers):
                self.graphs = BlendGraphs(self.model, self.cache, first, max_rows, buckets)
                self.graphs.warm_up()
                return len(buckets)
        model = self.model
        layers: dict = {}
        for layer in model.layers:
            shapes = tuple(tuple(p.shape) for p in layer.parameters())
            layers.setdefault((layer.self_attn.owns_kv, shapes), layer)
        weight = model.embed_tokens.weight
        x = torch.randn(max_rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
        cos, sin = model.rotary.cos_sin_half(torch.arange(max_rows, device=weight.device))
        buckets = row_buckets(max_rows, self.granule)
        for r in buckets:
            for layer in layers.values():
                layer(x[:r] * 0.02, None, cos[:r], sin[:r], _no_attention, model.kernels)
        return len(buckets)

    def features(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[N, 2H] matching features: fp16 on a GPU (matched by an fp16 product; stored
        references keep fp16 anyway), fp32 on the CPU."""
        weight = self.model.embed_tokens.weight
        if self._inv_norm is None:
            self._inv_norm = inverse_norms(weight)
        dtype = torch.float16 if weight.is_cuda else torch.float32
        return token_features(
            weight, token_ids, self.config.window, inv_norm=self._inv_norm, dtype=dtype
        )

    @torch.inference_mode()
    def plan(self, prompt_ids: list[int]) -> ReusePlan | None:
        """A reuse plan for a new prompt, or None (too short, no candidate, too few matches)."""
        cfg = self.config
        self.flush()  # references recorded by earlier steps take part in the lookup
        if len(prompt_ids) < cfg.min_prompt_tokens or not len(self.store):
            return None
        # [N] int64 via numpy: torch.tensor of a 5K-int list took 0.4-0.6 ms of host time
        ids = torch.from_numpy(np.fromiter(prompt_ids, np.int64, len(prompt_ids)))
        feats = self.features(ids)
        early: dict[str, TokenMatch] = {}

        def prefetch(ref: Reference) -> None:
            # the likeliest reference's matching is queued (no host sync) while the host
            # scores the shortlist, so the device runs it meanwhile; the same call as below
            early[ref.key] = match_tokens(feats, ref.features, cfg.threshold, self.granule)

        found = self.store.lookup(
            feats, cfg.min_candidate_score, prefetch if self.speculate else None, touch=False
        )
        if found is None:
            return None
        ref, score = found
        match = early.get(ref.key)
        if match is None:  # no guess, or another reference scored higher
            match = match_tokens(feats, ref.features, cfg.threshold, self.granule)
        ref_pos = match.ref_pos.cpu()  # the plan's second host sync (and the blend's none)
        if int((ref_pos >= 0).sum()) < cfg.min_reuse_fraction * len(prompt_ids):
            return None  # not reused: its reference keeps its place in the LRU order
        self.store.get(ref.key)  # reused: now the most recently used
        self.stats.planned += 1
        fixed: dict[int, int] = {}
        if ref.blocks is not None and cfg.recompute_layers == 1 and cfg.recompute_fraction < 1:
            fixed = sharing.shared_map(
                ref.blocks, ref.token_ids, ids, ref_pos, self.cache.block_size
            )
        shared = fixed if cfg.share_blocks else {}
        return ReusePlan(ref, ref_pos, score, ids, shared, fixed, self.blocks)

    def prefill(self, scheduled: list, block_table) -> None:
        """Blend the planned requests' prompt ranges of this step (see the module docstring).
        When every item of the step ends a planned prompt (`finish_in_blend`), each blend
        computes its last token too and leaves its final hidden state on the item
        (`semantic_hidden`): the runner then samples from those without a forward."""
        finish = self.config.finish_in_blend and all(_ends_plan(it) for it in scheduled)
        for item in scheduled:
            req = item.request
            plan: ReusePlan | None = getattr(req, "semantic", None)
            if plan is None:
                continue
            start = req.num_computed_tokens
            end = start + item.num_new_tokens
            stop = min(end - 1, req.num_prompt_tokens)  # the item keeps >= 1 token
            if end >= req.num_prompt_tokens > start:  # the prompt completes in this step
                self._completed(req, plan, block_table(req.request_id))
            if start == 0:
                req.num_reused_tokens = 0  # a recompute after preemption counts afresh
            if stop - start < 2:
                continue
            if plan.ref.blocks is not None and plan.pinned is None:
                continue  # its reference was freed before it was allocated: computed in full
            last = end if finish else stop  # [stop, end): the item's token, computed here too
            if plan.ids is not None and plan.ids.shape[0] == req.num_prompt_tokens:
                ids = plan.ids[start:last]  # the plan's tensor: no second 5K-int conversion
            else:
                ids = torch.tensor(req.prompt_token_ids[start:last], dtype=torch.int64)
            table = block_table(req.request_id)
            bs = self.cache.block_size
            result = blend_prefill(
                self.model,
                self.cache,
                table,
                ids,
                start,
                plan.ref,
                plan.ref_pos[start:last],
                self.config.recompute_fraction,
                self.config.recompute_layers,
                granule=self.granule,
                graphs=self.graphs,
                finish=finish,
                shared=sharing.positions(plan.shared, start, last, bs, table),
                fixed=sharing.positions(plan.fixed, start, last, bs),
            )
            item.semantic_hidden = result.hidden  # None: the forward computes the token
            req.num_reused_tokens += result.num_reused
            self.stats.reused_tokens += result.num_reused
            self.stats.blended_tokens += last - start
            req.num_computed_tokens = stop
            item.num_new_tokens = end - stop
        for item in scheduled:  # the blends are queued: completed prompts' references may go
            req = item.request
            plan = getattr(req, "semantic", None)
            done = req.num_computed_tokens + item.num_new_tokens >= req.num_prompt_tokens
            if plan is not None and plan.pinned is not None and done and self.blocks:
                self.blocks.unpin(plan)

    def _completed(self, req, plan: ReusePlan, table: list[int]) -> None:
        """A planned prompt completes in this step: count its shared blocks (`stats`, and the
        request's `num_shared_blocks`; `RequestOutput` has none of this)."""
        bs = self.cache.block_size
        first = req.num_cached_tokens // bs  # blocks before it came from the prefix cache
        n_shared = sum(
            1 for i, b in plan.shared.items() if first <= i < len(table) and table[i] == b
        )
        req.num_shared_blocks = n_shared
        self.stats.shared_blocks += n_shared
        self.stats.prompt_blocks += -(-req.num_prompt_tokens // bs)

    @torch.inference_mode()
    def record(self, scheduled: list, block_table) -> None:
        """Store the prompts this step completed in full (no plan, no library) as references:
        their KV and features are queued now, their LSH signatures copied back without a
        wait; they enter the store at a `flush` (at once on the CPU)."""
        self.flush(wait=False)
        for item in scheduled:
            req = item.request
            p = req.num_prompt_tokens
            start = req.num_computed_tokens
            if getattr(req, "semantic", None) is not None or req.library is not None:
                continue
            if not start < p <= start + item.num_new_tokens or p < self.config.min_prompt_tokens:
                continue
            ids = torch.tensor(req.prompt_token_ids, dtype=torch.int64)
            key = prompt_key(ids)
            if self.store.get(key) is not None or any(e[0].key == key for e in self._pending):
                continue
            ref = self._new_reference(key, ids, block_table(req.request_id))
            if ref is None:  # no block free for its last block: not stored
                continue
            self._pending.append((ref, *self.store.lsh.signatures_async(ref.features)))
            self.stats.stored += 1
        self.flush(wait=False)

    def flush(self, wait: bool = True) -> None:
        """Put the recorded references into the store, in order: all of them (`wait`: a
        host sync on their signatures' copies, long done when a later request asks), or
        those whose signatures are already on the host."""
        while self._pending:
            ref, sigs, done = self._pending[0]
            if done is not None and not done.query():
                if not wait:
                    return
                done.synchronize()
            stored = ref.key not in self.store and self.store.put(ref, sigs)
            if not stored and self.blocks is not None:
                self.blocks.on_evict(ref)  # not stored: its blocks go
            self._pending.pop(0)

    def _new_reference(self, key: str, ids: torch.Tensor, table: list[int]) -> Reference | None:
        """A reference of a prompt computed into `table`: its blocks held (`attach`ed; None
        when no block is free for its last one), else a copy (`reference`)."""
        if self.blocks is None:
            return self.reference(key, ids, table)
        c = self.cache
        blocks = self.blocks.hold(table, ids.shape[0])
        if blocks is None:
            return None
        slots = slots_of(blocks.table, c.block_size, 0, ids.shape[0], c.k.device)
        flat = (c.k.shape[0], -1, *c.k.shape[-2:])
        feats = self.features(ids).half()
        return Reference(key, ids, feats, c.k.view(flat), c.v.view(flat), slots, blocks)

    def reference(self, key: str, ids: torch.Tensor, table: list[int]) -> Reference:
        """A reference of a prompt whose KV for positions [0, len(ids)) is in `table`."""
        c = self.cache
        slots = slots_of(table, c.block_size, 0, ids.shape[0], c.k.device)
        flat = (c.k.shape[0], -1, *c.k.shape[-2:])
        k = c.k.view(flat)[:, slots]  # [L_kv, N, Hkv, D] (a gather: a copy)
        v = c.v.view(flat)[:, slots]
        # features in fp16: a tenth of an 8B model's KV per token instead of a fifth
        return Reference(key, ids, self.features(ids).half(), k, v)


def _ends_plan(item) -> bool:
    """Whether a scheduled item is a planned prompt's last range (nothing generated yet)."""
    req = item.request
    end = req.num_computed_tokens + item.num_new_tokens
    return req.semantic is not None and end == req.num_prompt_tokens == req.num_tokens


def _no_attention(slot: int, q: torch.Tensor, k, v) -> torch.Tensor:
    return q  # warm-up: any [T, Hq, D] tensor stands for the attention output


def row_buckets(max_rows: int, granule: int) -> list[int]:
    """Every row count `row_bucket` yields for 1..max_rows (ascending)."""
    out, r = [], 1
    while r <= max_rows:
        out.append(row_bucket(r, max_rows, granule))
        r = out[-1] + 1
    return out
