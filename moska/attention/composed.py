"""Shared attention of a group that reads a composition of libraries (library/composition.py).

Routing is over the union of the parts' chunks, on one scale: each part's routing index
estimates the log attention mass of its chunks (``routing.select.log_mass``: the scorer's
logit times the part's softmax scale, plus its APE log scale), the estimates are
concatenated and a row takes its top-k over all of them, ranked as ``routing.select.choose``
ranks chunks.

One slot space (fixed k; the default): the top-k becomes ONE Selections over the global
chunk ids (part base + local id) with ``from_topk``: no host sync. The resident libraries of
a model keep their KV in one arena per layer (library/arena.py), so a ChunkTable over the
global ids maps every part's chunks to their rows in that one pool tensor and ONE grouped
launch per layer serves chunks of every library. A tiered part's GPU slots are arena rows
too: its routed chunks are fetched into them first (one host sync per layer for all tiered
parts) and the table maps its chunks through its slot table of that layer
(attention/composed_tiers.py); only when its routed chunks outnumber its slots is each
further pass of them a launch of its own. Parts are launched together when
they share the pool tensor (``launch_groups``); parts of other APE temperatures in one group
pass the kernel a factor on the softmax scale per global chunk (``chunk_scales``; parts of
one temperature pass none, the kernel's one-scale path). A part with pools of its own (FP8,
resident or tiered; loaded without an arena) is a launch of its own over the same
selections, its table leaving
the other parts' chunks empty (o = 0, lse = -inf), so the groups' states add up exactly.
APE's log scale, which may differ between the parts of one group, is added per selection
after the launch.

Otherwise (adaptive k by mass): the mask of chosen chunks turns into one Selections per part
(``from_mask``, a host sync per part and layer), each part's launch reads its own (a tiered
part through ``ChunkTiers.attend``), and the states are concatenated with chunk ids made
global.

Either way the states join the rows' own in the backend's one ``merge_selections``: exact,
since every chunk state is an (o, lse) over a disjoint key set. FP8 parts pass their
per-row scales. A composed step runs eagerly (never as a CUDA graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moska.attention import composed_tiers
from moska.attention.metadata import LibraryGroup
from moska.attention.routing_report import GroupRouting
from moska.attention.shared import all_chunk_selections, fp8_kwargs
from moska.kernel_ops import KernelOps
from moska.kernels.selections import Selections, from_topk
from moska.kernels.shared_inputs import ChunkTable


def composed_group_states(
    ops: KernelOps,
    layer: int,
    q_rows: torch.Tensor,  # [n, Hq, D]
    group: LibraryGroup,
    sm_scale: float,
    keymax_programs: int | None = None,
    report: GroupRouting | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Selections]:
    """(o_sel [N, G, D], lse_sel [N, G], sel) of a composed group's rows: every part's
    routed chunk states, chunk ids global. Records the selections and measures coverage
    into `report` when the group asks, as the backend does for a single library."""
    comp = group.composed()
    parts = comp.parts
    adjust = [shared_logit_adjustment(p) for p in parts]
    scales = [sm_scale * a for a, _ in adjust]
    biases = [b for _, b in adjust]
    if _global_ok(group):
        sel = select_global(q_rows, group, layer, scales, biases, ops.triton_routing)
        sel, steps = composed_tiers.stage(comp, layer, sel)  # tiered parts' chunks fetched
        if sel.req.numel():
            o_sel, lse_sel = global_states(ops, layer, q_rows, comp, sel, sm_scale, steps)
        else:  # the skip policy dropped every selection
            o_sel, lse_sel, sel = _concat([], q_rows, parts[0].k_pools[layer].shape[1])
        composed_tiers.finish(steps)
        return _report(ops, layer, q_rows, group, report, scales, adjust, o_sel, lse_sel, sel)
    sels = select_union(q_rows, group, layer, scales, biases, ops.triton_routing)
    states = []
    for part, base, sel, scale, (_, log_scale) in zip(parts, comp.bases, sels, scales, adjust):
        if sel.req.numel() == 0:  # no row took a chunk of this part
            continue
        o, lse, sel = _part_states(ops, layer, q_rows, part, sel, scale)
        if log_scale:
            lse = lse + log_scale
        states.append((o, lse, sel, base))
    o_sel, lse_sel, sel = _concat(states, q_rows, parts[0].k_pools[layer].shape[1])
    return _report(ops, layer, q_rows, group, report, scales, adjust, o_sel, lse_sel, sel)


def _report(ops, layer, q_rows, group, report, scales, adjust, o_sel, lse_sel, sel):
    """Record the selections and measure coverage into `report` when the group asks."""
    comp = group.composed()
    if report is None:
        return o_sel, lse_sel, sel
    if group.record:
        report.selections[layer] = sel
    if layer in group.coverage_layers:
        report.coverage[layer] = _coverage(ops, layer, q_rows, comp, scales, adjust, lse_sel, sel)
    return o_sel, lse_sel, sel


def _global_ok(group: LibraryGroup) -> bool:
    """Whether the group's rows can be served in one slot space: a fixed k (or every chunk);
    tiered parts included (their routed chunks fetched first: attention/composed_tiers.py)."""
    from moska.routing import RoutingPolicy

    policy = group.policy or RoutingPolicy(scorer=group.scorer)
    return policy.mass_threshold is None


def shared_logit_adjustment(library: Any) -> tuple[float, float]:
    """library.positions' (factor on sm_scale, bias on the LSE), imported on use: the library
    package imports the attention backend, which imports this module."""
    from moska.library.positions import shared_logit_adjustment as adjustment

    return adjustment(library)


@dataclass(frozen=True)
class LaunchGroup:
    """Parts of a composition served by one grouped launch: they share the pool tensor
    (``source``: the arena, or a part with pools of its own). ``factor`` on the softmax scale
    is the parts' APE 1/T when they share it, else 1 and ``chunk_scales`` holds it per
    global chunk. ``table`` maps the global chunk ids to their rows (other groups' chunks
    empty); ``bias`` is APE's log scale, one number or one per global chunk. ``tiered``:
    (part, base, first row of its slots) of tiered members, whose spans of the table follow
    their slot tables layer by layer (``table_at``)."""

    source: Any  # KVArena or LoadedLibrary: what k_pools / v_pools are read from
    fp8: Any  # the FP8 part (its kv_scales) or None
    factor: float
    table: ChunkTable
    bias: float | torch.Tensor
    chunk_scales: torch.Tensor | None = None  # [C] fp32 when the parts' 1/T differ
    tiered: tuple[tuple[Any, int, int], ...] = ()

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.k_pools[layer], self.source.v_pools[layer]

    def table_at(self, layer: int) -> ChunkTable:
        if self.tiered:
            composed_tiers.refresh_table(self.table, self.tiered, layer)
        return self.table


def launch_groups(comp) -> list[LaunchGroup]:
    """The composition's launch groups (built once per composition; see the module doc)."""
    if comp.slot_tables is not None:
        return comp.slot_tables
    keyed: dict[int, list[int]] = {}
    ranges = [_range(part) for part in comp.parts]
    for i, part in enumerate(comp.parts):
        rng = ranges[i]
        keyed.setdefault(id(part if rng is None else rng.arena), []).append(i)
    groups = []
    for members in keyed.values():
        offs = comp.parts[members[0]].chunk_offsets
        starts = torch.zeros(comp.num_chunks, dtype=torch.int32, device=offs.device)
        ends = torch.zeros_like(starts)
        bias = torch.zeros(comp.num_chunks, dtype=torch.float32, device=offs.device)
        factors = torch.ones(comp.num_chunks, dtype=torch.float32, device=offs.device)
        tiered = []
        for i in members:
            part, base, rng = comp.parts[i], comp.bases[i], ranges[i]
            row = 0 if rng is None else rng.start
            span = slice(base, base + part.num_chunks)
            if getattr(part, "tiers", None) is not None:  # by slot, per layer (table_at)
                tiered.append((part, base, row))
            else:
                starts[span] = part.chunk_offsets[:-1] + row
                ends[span] = part.chunk_offsets[1:] + row
            factors[span], bias[span] = shared_logit_adjustment(part)
        logs = {shared_logit_adjustment(comp.parts[i])[1] for i in members}
        temps = {shared_logit_adjustment(comp.parts[i])[0] for i in members}
        first, rng = comp.parts[members[0]], ranges[members[0]]
        groups.append(
            LaunchGroup(
                first if rng is None else rng.arena,
                first if getattr(first, "kv_scale_pools", None) else None,
                temps.pop() if len(temps) == 1 else 1.0,
                ChunkTable(starts, ends),
                logs.pop() if len(logs) == 1 else bias,
                None if len(temps) == 1 else factors,
                tuple(tiered),
            )
        )
    comp.slot_tables = groups
    return groups


def select_global(
    q_rows: torch.Tensor,
    group: LibraryGroup,
    layer: int,
    scales: list[float],
    log_scales: list[float],
    use_triton: bool = True,
) -> Selections:
    """One Selections over the global chunk ids (part base + local id): each row's top-k of
    the parts' estimates concatenated, ranked as ``routing.select.choose`` ranks them, by
    ``from_topk`` (no host sync; fixed k only)."""
    from moska.routing import RoutingPolicy, log_mass

    comp = group.composed()
    n, dev, C = q_rows.shape[0], q_rows.device, comp.num_chunks
    hkv = comp.parts[0].k_pools[layer].shape[1]
    policy = group.policy or RoutingPolicy(scorer=group.scorer)
    if group.top_k >= C or layer < policy.dense_layers:
        return all_chunk_selections(n, hkv, C, dev, use_triton)
    estimates = [
        log_mass(q_rows, part, layer, group.top_k, policy, scale, use_triton).float() + bias
        for part, scale, bias in zip(comp.parts, scales, log_scales)
    ]
    share = torch.softmax(torch.cat(estimates, dim=-1), dim=-1).nan_to_num(0.0)
    if not policy.per_kv_head:
        share = share.mean(dim=1, keepdim=True)  # [n, 1, C]
    if policy.always_first:
        share[..., list(comp.bases)[: group.top_k]] = float("inf")
    chosen = share.topk(group.top_k, dim=-1).indices  # [n, Hr, k]
    return from_topk(chosen, hkv, C, use_triton)


def _range(part):
    """The part's arena rows (library/arena.py) when its pools are views of them, else None."""
    rng = getattr(part, "arena_range", None)
    return rng if rng is not None and rng.holds(part) else None


def global_states(ops, layer, q_rows, comp, sel: Selections, sm_scale: float, steps=()):
    """(o, lse) of every selection: one grouped launch per launch group over the same
    selections (one in all when the parts share the arena, whatever their temperatures,
    tiered parts' slots included); a selection is non-empty in exactly one group, so the
    groups' states add up (o: the others are 0; lse: the others are -inf). ``steps``: the
    tiered parts' staged chunks; passes beyond the first are launches of their own."""
    groups = launch_groups(comp)
    o_sel = lse_sel = None
    for group in groups:
        o, lse = launch(ops, layer, q_rows, group, sel, sm_scale)
        o_sel = o if o_sel is None else o_sel + o
        lse_sel = lse if lse_sel is None else torch.maximum(lse_sel, lse)
    assert o_sel is not None and lse_sel is not None  # a composition has parts

    def part_launch(part, sub: Selections):
        group = next(g for g in groups if any(t[0] is part for t in g.tiered))
        return launch(ops, layer, q_rows, group, sub, sm_scale)

    composed_tiers.later_passes(list(steps), sel, part_launch, o_sel, lse_sel, comp.num_chunks)
    return o_sel, lse_sel


def launch(ops, layer, q_rows, group: LaunchGroup, sel: Selections, sm_scale: float):
    """One grouped launch of ``group`` over ``sel``: (o, lse) with APE's log scale added."""
    k_pool, v_pool = group.pools(layer)
    extra = {} if group.fp8 is None else fp8_kwargs(group.fp8, layer)
    if group.chunk_scales is not None:
        extra["chunk_scales"] = group.chunk_scales
    table = group.table_at(layer)
    for part, _, _ in group.tiered:  # the slots' copies are done
        part.tiers.before_read(layer)
    o, lse = ops.grouped_shared(
        q_rows, k_pool, v_pool, table, sel, sm_scale * group.factor, **extra
    )
    for part, _, _ in group.tiered:  # later copies into the slots wait for this launch
        part.tiers.after_read(layer)
    if isinstance(group.bias, torch.Tensor):
        lse = lse + group.bias[sel.chunk.long()][:, None]
    elif group.bias:
        lse = lse + group.bias
    return o, lse


def select_union(
    q_rows: torch.Tensor,
    group: LibraryGroup,
    layer: int,
    scales: list[float],
    log_scales: list[float],
    use_triton: bool = True,
) -> list[Selections]:
    """Each part's Selections (local chunk ids) when every row takes its top-k over the
    union of the parts' chunks (every chunk when top_k covers them all)."""
    from moska.routing import RoutingPolicy, choose, from_mask, log_mass

    comp = group.composed()
    n, dev = q_rows.shape[0], q_rows.device
    policy = group.policy or RoutingPolicy(scorer=group.scorer)
    if group.top_k >= comp.num_chunks or layer < policy.dense_layers:
        return [
            all_chunk_selections(n, p.k_pools[layer].shape[1], p.num_chunks, dev, use_triton)
            for p in comp.parts
        ]
    estimates = []
    for part, scale, bias in zip(comp.parts, scales, log_scales):
        m = log_mass(q_rows, part, layer, group.top_k, policy, scale, use_triton)
        estimates.append(m.float() + bias)  # [n, Hkv, C_p] log mass, one scale for all
    always = list(comp.bases)[: group.top_k] if policy.always_first else []
    mask = choose(
        torch.cat(estimates, dim=-1), group.top_k, always, policy.per_kv_head,
        policy.mass_threshold,
    )  # fmt: skip
    hkv = estimates[0].shape[1]
    return [from_mask(mask[..., b : b + p.num_chunks], hkv) for p, b in zip(comp.parts, comp.bases)]


def _part_states(ops, layer, q_rows, part, sel: Selections, scale: float):
    if getattr(part, "tiers", None) is not None:  # misses fetched, read by slot
        return part.tiers.attend(ops, layer, q_rows, sel, scale)
    o, lse = ops.grouped_shared(
        q_rows,
        part.k_pools[layer],
        part.v_pools[layer],
        part.chunk_offsets,
        sel,
        scale,
        **fp8_kwargs(part, layer),
    )
    return o, lse, sel


def _concat(states: list, q_rows: torch.Tensor, hkv: int):
    """One (o, lse, Selections) from the parts' states, chunk ids made global. Without
    ``row_order`` the merge groups the selections by row itself."""
    if not states:
        g, d = q_rows.shape[1] // hkv, q_rows.shape[2]
        none = torch.zeros(0, dtype=torch.int32, device=q_rows.device)
        o = torch.zeros(0, g, d, dtype=q_rows.dtype, device=q_rows.device)
        lse = torch.zeros(0, g, dtype=torch.float32, device=q_rows.device)
        return o, lse, Selections(none, none, none)
    dtype = states[0][0].dtype
    o = torch.cat([s[0].to(dtype) for s in states])
    lse = torch.cat([s[1].float() for s in states])
    sel = Selections(
        torch.cat([s[2].req for s in states]),
        torch.cat([s[2].kv_head for s in states]),
        torch.cat([part_sel.chunk + base for _, _, part_sel, base in states]),
    )
    return o, lse, sel


def _coverage(ops, layer, q_rows, comp, scales, adjust, lse_sel, sel) -> torch.Tensor:
    """Share of each row's attention mass over every chunk of every part that its routed
    chunks hold, averaged over query heads (an all-chunks pass: debugging only)."""
    n = q_rows.shape[0]
    totals = []
    for part, scale, (_, bias) in zip(comp.parts, scales, adjust):
        hkv = part.k_pools[layer].shape[1]
        every = all_chunk_selections(n, hkv, part.num_chunks, q_rows.device, ops.triton_routing)
        if getattr(part, "tiers", None) is not None:
            _, lse_all, _ = part.tiers.attend(ops, layer, q_rows, every, scale, wait=True)
        else:
            _, lse_all = ops.grouped_shared(
                q_rows, part.k_pools[layer], part.v_pools[layer], part.chunk_offsets, every,
                scale, **fp8_kwargs(part, layer),
            )  # fmt: skip
        g = lse_all.shape[1]
        totals.append(lse_all.view(part.num_chunks, hkv, n, g) + bias)
    total = torch.logsumexp(torch.cat(totals, dim=0), dim=0)  # [Hkv, n, G]
    hkv, g = total.shape[0], total.shape[2]
    share = torch.exp(lse_sel - total[sel.kv_head.long(), sel.req.long()])  # [N, G]
    covered = torch.zeros(n, dtype=torch.float32, device=q_rows.device)
    covered.index_add_(0, sel.req.long(), share.sum(dim=1))
    return covered / (hkv * g)
