"""Libraries (shared KV) under Helix: replicated over a KVP group, the work split over it.

Rank r (KVP rank r % KVP of TPA group r // KVP) holds its TPA group's KV heads of every
chunk of a library, loaded from the store as under tensor parallelism (`tp_library.py`:
LOAD_LIBRARY / UNLOAD_LIBRARY, `load_library(kv_heads=)`): the library is *replicated* over
the KVP ranks of a group, not sharded. What is split is the attention over it: every KVP
rank of a group routes the same rows with the same query heads (its group's, projected from
the same hidden state) and gets the same selections, sorted by (chunk, KV head, row); KVP
rank j attends the j-th of KVP equal contiguous slices of them (`own_part`) — equal work
per rank however skewed the routing, and a chunk's readers stay together except at the
slice edges. Its library state is merged into its unique-KV partial by LSE before the
all-to-all, whose LSE merge then adds the other ranks' parts: exact (each selection is
attended once, on one rank).

Routing across TPA groups: a policy that needs every KV head's scores (summed over heads,
two-stage, adaptive k) exchanges them over the TPA ranks that share this KVP rank (one
rank per group, so each KV head is counted once): `HelixHeadSplit`, the tensor-parallel
`HeadSplit` over that group; with TPA = 1 a rank holds every head and routes alone.

Why replicated: the selections change every layer and step, so a chunk-sharded library
would route query rows between the KVP ranks (another all-to-all, as shared-KV ranks do);
replicated, the only exchange is the one Helix already makes. The cost is memory: each KVP
rank holds 1 / TPA of each library, as a TP rank does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moska.attention.routing_report import GroupRouting
from moska.attention.shared import fp8_kwargs, route_group, routing_coverage
from moska.distributed.comm import Collectives
from moska.distributed.tp_library import HeadSplit, TensorParallelLibraries, WorkerLibraries
from moska.kernel_ops import KernelOps
from moska.kernels.selections import Selections


@dataclass(frozen=True)
class HelixHeadSplit(HeadSplit):
    """`HeadSplit` whose `comm` holds one rank per TPA group (the ranks with this KVP
    rank): whole KV heads, each on exactly one of them."""

    def needs_exchange(self, policy: Any) -> bool:
        return self.comm.world_size > 1 and super().needs_exchange(policy)


def head_split(model: Any, cross: Collectives) -> HelixHeadSplit:
    """The split of a HelixCausalLM's rank; `cross`: its TPA ranks (HelixModel.cross)."""
    start, stop = model.plan.kv_heads
    return HelixHeadSplit(start, stop, model.full_config.num_kv_heads, False, cross)


class HelixLibraries(TensorParallelLibraries):
    """Rank 0's library manager under Helix: each rank loads its TPA group's KV heads of a
    library a request acquires (`TensorParallelLibraries`); builds are refused (each rank
    holds a slice of the weights)."""

    def __init__(self, root, loaded_model, device, channel, split: HelixHeadSplit) -> None:
        super().__init__(root, loaded_model, device, channel)
        self.split = split
        self.load_options = {"kv_heads": split.heads}


class HelixWorkerLibraries(WorkerLibraries):
    """A rank other than 0: its TPA group's KV heads of the builds rank 0 names."""

    def __init__(self, device: torch.device, split: HelixHeadSplit) -> None:
        self.split, self.device = split, device
        self.builds = {}


def own_part(sel: Selections, kvp_rank: int, kvp: int) -> Selections:
    """KVP rank `kvp_rank`'s slice of `sel`: the `kvp_rank`-th of `kvp` equal contiguous
    slices, still sorted by (chunk, KV head, row); the merge sorts its own row order."""
    n = sel.req.numel()
    lo, hi = kvp_rank * n // kvp, (kvp_rank + 1) * n // kvp
    return Selections(sel.req[lo:hi], sel.kv_head[lo:hi], sel.chunk[lo:hi])


def library_state(
    ops: KernelOps,
    layer: int,
    q: torch.Tensor,  # [T, Hq_tpa, D] this rank's query heads of every row
    groups: list,  # the step's LibraryGroups
    reports: list[GroupRouting],
    sm_scale: float,
    kvp_rank: int,
    kvp: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (o [T, Hq_tpa, D], lse [T, Hq_tpa] fp32)
    """This rank's part of the step's library attention, per row: rows of no group, and
    rows none of whose selections fell in this rank's part, are (0, -inf)."""
    from moska.distributed.helix import HelixConfigError
    from moska.library.composition import is_composed
    from moska.library.positions import shared_logit_adjustment

    t, hq, _ = q.shape
    o = torch.zeros_like(q)
    lse = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for group, report in zip(groups, reports):
        lib = group.library
        if is_composed(lib) or getattr(lib, "tiers", None) is not None:
            raise HelixConfigError(
                "composed libraries and library tiers do not run with --helix; request one "
                "library at a time, with library_gpu_budget unset"
            )
        rows = None if group.all_rows else group.rows
        q_rows = q if rows is None else q.index_select(0, rows)
        scale, log_scale = shared_logit_adjustment(lib)  # position-independent: APE tempering
        sm = sm_scale * scale
        sel = route_group(ops, layer, q_rows, group, sm)
        part = own_part(sel, kvp_rank, kvp)
        kw = fp8_kwargs(lib, layer)
        k_pool, v_pool = lib.k_pools[layer], lib.v_pools[layer]
        o_sel, lse_sel = ops.grouped_shared(
            q_rows, k_pool, v_pool, lib.chunk_offsets, part, sm, **kw
        )
        if group.record:
            report.selections[layer] = sel  # every rank's selections (its KV heads)
        if layer in group.coverage_layers:  # debugging: the whole selection's LSE here
            _, lse_all = ops.grouped_shared(
                q_rows, k_pool, v_pool, lib.chunk_offsets, sel, sm, **kw
            )
            report.coverage[layer] = routing_coverage(ops, layer, q_rows, group, lse_all, sel, sm)
        if log_scale:
            lse_sel = lse_sel + log_scale
        base_o, base_lse = (o, lse) if rows is None else (o[rows], lse[rows])
        o_rows, lse_rows = ops.merge_selections(base_o, base_lse, o_sel, lse_sel, part)
        if rows is None:
            o, lse = o_rows.to(q.dtype), lse_rows
        else:
            o.index_copy_(0, rows, o_rows.to(q.dtype))
            lse.index_copy_(0, rows, lse_rows)
    return o, lse
