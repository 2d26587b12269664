"""Shared attention of a group that reads a composition of libraries (library/composition.py).

Routing is over the union of the parts' chunks, on one scale: each part's routing index
estimates the log attention mass of its chunks (``routing.select.log_mass``: the scorer's
logit times the part's softmax scale, plus its APE log scale), the estimates are
concatenated and a row takes its top-k over all of them (``routing.select.choose``, the
rule adaptive k and pages use; with fixed k it is the top-k of the estimates). The mask
turns into one Selections per part (``from_mask``: one host sync per layer, so a composed
step runs eagerly, never as a CUDA graph).

Attention: one grouped launch per part over its own pool (the parts' pools are separate
allocations; placing them in one arena would mean copying every library at load), then the
parts' chunk states are concatenated, with chunk ids made global, and merged with the rows'
own state in the one ``merge_selections`` of the backend: exact, since every chunk state is
an (o, lse) over a disjoint key set. A tiered part fetches its chunks through its tiers and
an FP8 part passes its scales, as alone.
"""

from __future__ import annotations

import torch

from moska.attention.metadata import LibraryGroup
from moska.attention.shared import all_chunk_selections, fp8_kwargs
from moska.kernel_ops import KernelOps
from moska.kernels.selections import Selections
from moska.library.positions import shared_logit_adjustment


def composed_group_states(
    ops: KernelOps,
    layer: int,
    q_rows: torch.Tensor,  # [n, Hq, D]
    group: LibraryGroup,
    sm_scale: float,
    keymax_programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Selections]:
    """(o_sel [N, G, D], lse_sel [N, G], sel) of a composed group's rows: every part's
    routed chunk states, chunk ids global. Records the selections and measures coverage
    when the group asks, as the backend does for a single library."""
    comp = group.library
    parts = comp.parts
    adjust = [shared_logit_adjustment(p) for p in parts]
    scales = [sm_scale * a for a, _ in adjust]
    sels = select_union(q_rows, group, layer, scales, [b for _, b in adjust], ops.triton_routing)
    states = []
    for part, base, sel, scale, (_, log_scale) in zip(parts, comp.bases, sels, scales, adjust):
        if sel.req.numel() == 0:  # no row took a chunk of this part
            continue
        o, lse, sel = _part_states(ops, layer, q_rows, part, sel, scale)
        if log_scale:
            lse = lse + log_scale
        states.append((o, lse, sel, base))
    o_sel, lse_sel, sel = _concat(states, q_rows, parts[0].k_pools[layer].shape[1])
    if group.record:
        group.recorded[layer] = sel
    if layer in group.coverage_layers:
        group.coverage[layer] = _coverage(ops, layer, q_rows, comp, scales, adjust, lse_sel, sel)
    return o_sel, lse_sel, sel


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

    comp = group.library
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
