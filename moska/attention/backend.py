"""The attention the model calls at every layer: write the new tokens' KV into the paged
unique cache, attend over each request's own KV, and — for rows that read a shared
library — route to chunks, attend to them in one grouped launch and merge by LSE."""

from __future__ import annotations

import torch

from moska.attention.kv_cache import PagedKVCache
from moska.attention.metadata import AttentionMetadata, LibraryGroup
from moska.attention.ops import AttentionOps
from moska.attention.shared import routing_coverage, shared_attention_for_group


class PagedAttention:
    def __init__(self, cache: PagedKVCache, ops: AttentionOps, sm_scale: float) -> None:
        self.cache = cache
        self.ops = ops
        self.sm_scale = sm_scale

    def bind(self, meta: AttentionMetadata) -> BoundAttention:
        return BoundAttention(self, meta)


class BoundAttention:
    """The `attn(layer, q, k, v) -> o` callable for one step."""

    def __init__(self, parent: PagedAttention, meta: AttentionMetadata) -> None:
        self.p = parent
        self.meta = meta

    def __call__(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
    ) -> torch.Tensor:  # [T, Hq, D]
        p, m = self.p, self.meta
        p.cache.write(layer, k, v, m.slot_mapping)
        kc, vc = p.cache.k[layer], p.cache.v[layer]
        if m.decode_only:
            o, lse = p.ops.paged_decode(q, kc, vc, m.block_tables, m.seq_lens, p.sm_scale)
        else:
            o, lse = p.ops.paged_prefill(
                q, kc, vc, m.block_tables, m.cu_q_lens, m.seq_lens, p.sm_scale
            )
        for group in m.groups:
            o = _merge_group(p, layer, q, o, lse, group)
        return o


def _merge_group(
    p: PagedAttention,
    layer: int,
    q: torch.Tensor,  # [T, Hq, D]
    o: torch.Tensor,  # [T, Hq, D]
    lse: torch.Tensor,  # [T, Hq] float32
    group: LibraryGroup,
) -> torch.Tensor:
    rows = group.rows
    q_rows = q if group.all_rows else q.index_select(0, rows)
    o_sel, lse_sel, sel = shared_attention_for_group(p.ops, layer, q_rows, group, p.sm_scale)
    if group.record:
        group.recorded[layer] = sel
    if layer in group.coverage_layers:
        group.coverage[layer] = routing_coverage(
            p.ops, layer, q_rows, group, lse_sel, sel, p.sm_scale
        )
    if group.all_rows:
        return p.ops.merge_selections(o, lse, o_sel, lse_sel, sel)[0].to(o.dtype)
    o_rows, _ = p.ops.merge_selections(
        o.index_select(0, rows), lse.index_select(0, rows), o_sel, lse_sel, sel
    )
    o.index_copy_(0, rows, o_rows.to(o.dtype))
    return o
