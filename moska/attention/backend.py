"""The attention the model calls at every layer: write the new tokens' KV into the paged
unique cache, attend over each request's own KV, and — for rows that read a shared
library — route to chunks, attend to them in one grouped launch and merge by LSE.

On CUDA the routing and the shared-chunk attention (compute-heavy: one matrix product per
chunk for all its readers) run on a high-priority side stream while the unique attention
(memory-bound: every request streams its own KV) runs on the current stream, so the two
share the GPU instead of taking turns; the merge waits for both. CUDA-graph capturable
(the side stream forks from and joins the current one inside each layer).
"""

from __future__ import annotations

import torch

from moska.attention.composed import composed_group_states
from moska.attention.kv_cache import PagedKVCache
from moska.attention.metadata import AttentionMetadata, LibraryGroup
from moska.attention.routing_report import GroupRouting
from moska.attention.shared import (
    reported_selections,
    routing_coverage,
    shared_attention_for_group,
)
from moska.kernel_ops import KernelOps
from moska.library.composition import is_composed
from moska.library.positions import shared_logit_adjustment


class PagedAttention:
    def __init__(
        self, cache: PagedKVCache, ops: KernelOps, sm_scale: float, overlap: bool = True
    ) -> None:
        self.cache = cache
        self.ops = ops
        self.sm_scale = sm_scale
        self.overlap = overlap  # shared attention on a side stream (CUDA only)
        # Overlapped, the key-max router launch may be capped at this many programs per SM,
        # so that it runs beside the unique attention instead of queueing behind it. It pays
        # when the unique attention is long: grouped two-stage step at B = 1024 with 4096
        # unique tokens, 6.57 -> 6.04 ms as a CUDA graph (bench/results/kernels.json). With
        # 1K unique tokens (bench/results/decode_two_stage.json) the decode step got slower,
        # 47.1 -> 51.1 ms at B = 256, so it is off (None) by default.
        self.keymax_programs_per_sm: int | None = None
        self._side: torch.cuda.Stream | None = None
        self._sms = 0  # SMs of the side stream's device
        # shared-KV ranks (distributed/shared_kv_engine.py): libraries' chunks attended there
        self.shared_kv = None

    def side_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if not (self.overlap and device.type == "cuda"):
            return None
        if self._side is None or self._side.device != device:
            # the highest priority: its blocks go first as the unique attention's retire
            high = torch.cuda.Stream.priority_range()[1]  # type: ignore[call-arg]  # a static method; the stubs say otherwise
            self._side = torch.cuda.Stream(device=device, priority=high)
            self._sms = torch.cuda.get_device_properties(device).multi_processor_count
        return self._side

    def keymax_programs(self) -> int | None:
        """The key-max grid cap for the side stream's launches (None: uncapped)."""
        if self.keymax_programs_per_sm is None:
            return None
        return self.keymax_programs_per_sm * self._sms

    def bind(self, meta: AttentionMetadata) -> BoundAttention:
        if self.shared_kv is not None and meta.groups:  # the shared ranks learn the forward
            self.shared_kv.begin(meta.groups)
        return BoundAttention(self, meta)


class BoundAttention:
    """The `attn(layer, q, k, v) -> o` callable for one step. `routing[i]` is what group
    i's routing reported in the forward (attention/routing_report.py)."""

    def __init__(self, parent: PagedAttention, meta: AttentionMetadata) -> None:
        self.p = parent
        self.meta = meta
        self.routing = [GroupRouting() for _ in meta.groups]

    def __call__(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor | None,  # [T, Hkv, D]; None: an MLKV layer reading its source's KV
        v: torch.Tensor | None,  # [T, Hkv, D]
    ) -> torch.Tensor:  # [T, Hq, D]
        p, m = self.p, self.meta
        if k is not None:  # `layer` is the KV slot (model/llama.py)
            assert v is not None  # k and v come together
            p.cache.write(layer, k, v, m.slot_mapping, p.ops.kv_write)
        side = p.side_stream(q.device) if m.groups else None
        if side is None:
            o, lse = self._unique(layer, q)
            for group, report in zip(m.groups, self.routing):
                o = _merge_group(p, o, lse, group, _shared_group(p, layer, q, group, report))
            return o
        cur = torch.cuda.current_stream(q.device)
        side.wait_stream(cur)
        programs = p.keymax_programs()
        with torch.cuda.stream(side):
            shared = [
                _shared_group(p, layer, q, group, report, programs)
                for group, report in zip(m.groups, self.routing)
            ]
        o, lse = self._unique(layer, q)
        cur.wait_stream(side)
        for group, states in zip(m.groups, shared):
            o = _merge_group(p, o, lse, group, states)
        return o

    def _unique(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, m = self.p, self.meta
        kc, vc = p.cache.k[layer], p.cache.v[layer]
        if m.decode_only and m.flexi is not None:  # FlexiCache: per-KV-head page lists
            return m.flexi.attend(layer, q, kc, vc, p.ops.paged_decode_heads, p.sm_scale)
        if m.decode_only:
            return p.ops.paged_decode(q, kc, vc, m.block_tables, m.seq_lens, p.sm_scale)
        o, lse = p.ops.paged_prefill(q, kc, vc, m.block_tables, m.cu_q_lens, m.seq_lens, p.sm_scale)
        if m.flexi is not None:  # FlexiCache: offloaded requests' decode rows
            return m.flexi.patch(layer, q, o, lse, kc, vc, p.ops.paged_decode_heads, p.sm_scale)
        return o, lse


def _shared_group(
    p: PagedAttention,
    layer: int,
    q: torch.Tensor,
    group: LibraryGroup,
    report: GroupRouting,
    keymax_programs: int | None = None,
):
    """Routed shared-chunk states of a group's rows: (o_sel, lse_sel, sel); what the group
    asks reported goes into `report`."""
    q_rows = q if group.all_rows else q.index_select(0, group.rows)
    if is_composed(group.library):  # several libraries: routed over their union
        return composed_group_states(
            p.ops, layer, q_rows, group, p.sm_scale, keymax_programs, report
        )
    # a position-independent library's APE tempering (library/positions.py); exact: 1, 0
    scale, log_scale = shared_logit_adjustment(group.library)
    sm_scale = p.sm_scale * scale
    if p.shared_kv is not None:  # chunks on shared-KV ranks: per-row states come back
        o_sel, lse_sel, sel, routed = p.shared_kv.group_states(
            p.ops, layer, q_rows, group, sm_scale, keymax_programs
        )
    else:
        o_sel, lse_sel, sel = shared_attention_for_group(
            p.ops, layer, q_rows, group, sm_scale, keymax_programs
        )
        routed = sel
        if group.record:  # every chunk read as one span: the report names every chunk
            routed = reported_selections(p.ops, layer, q_rows, group, sel)
    if group.record:
        report.selections[layer] = routed
    if layer in group.coverage_layers:
        report.coverage[layer] = routing_coverage(
            p.ops, layer, q_rows, group, lse_sel, sel, sm_scale
        )
    if log_scale:
        lse_sel = lse_sel + log_scale  # the library part's weight in the merge times S
    return o_sel, lse_sel, sel


def _merge_group(
    p: PagedAttention,
    o: torch.Tensor,  # [T, Hq, D]
    lse: torch.Tensor,  # [T, Hq] float32
    group: LibraryGroup,
    states: tuple,  # (o_sel, lse_sel, sel) of the group's rows
) -> torch.Tensor:
    o_sel, lse_sel, sel = states
    if group.all_rows:
        return p.ops.merge_selections(o, lse, o_sel, lse_sel, sel)[0].to(o.dtype)
    rows = group.rows
    o_rows, _ = p.ops.merge_selections(
        o.index_select(0, rows), lse.index_select(0, rows), o_sel, lse_sel, sel
    )
    o.index_copy_(0, rows, o_rows.to(o.dtype))
    return o
