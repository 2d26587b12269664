"""Tiered parts of a composition in its one-slot-space launch (attention/composed.py).

A tiered library (library/tiers.py) holds only some chunks per layer, in GPU slots that the
manager gives it as rows of the engine's arena (library/arena.py) like a resident library's
rows. So its routed chunks are fetched into their slots first (``stage``: one host sync per
layer for every tiered part together, the distinct global chunk ids), then the launch of the
arena reads them with the resident parts' chunks: the launch group's table maps a tiered
part's global ids through that layer's slot table (``LaunchGroup.table_at``), an absent chunk
empty. One grouped launch per layer, as for resident parts alone, unless a part's routed
chunks outnumber its slots ("wait": then every later pass of at most ``num_slots`` chunks is
a launch of its own over those chunks' selections, ``later_passes``; exact, each selection is
computed by exactly one launch). "skip" drops the selections of absent chunks before the
launch and fetches them after it (``finish``), as a tiered library alone does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moska.kernels.selections import Selections


@dataclass(frozen=True)
class PartStep:
    """A tiered part's staged chunks for one layer: the part, its global base, and its
    ``library.tiers.TierStep``."""

    part: Any
    base: int
    step: Any


def stage(comp: Any, layer: int, sel: Selections) -> tuple[Selections, list[PartStep]]:
    """Fetch every tiered part's routed chunks of ``layer`` (``sel``: global chunk ids) into
    its slots: (sel less what the skip policy dropped, the parts' steps). No tiered part:
    ``sel`` as it is, no host sync."""
    tiered = [(p, b) for p, b in zip(comp.parts, comp.bases) if p.tiers is not None]
    if not tiered:
        return sel, []
    # the routed chunks with their selection counts: the one host sync of the layer
    ids, counts = torch.stack(torch.unique(sel.chunk, return_counts=True)).tolist()
    steps, dropped = [], []
    for part, base in tiered:
        end = base + part.num_chunks
        demand = {c - base: n for c, n in zip(ids, counts) if base <= c < end}
        step = part.tiers.stage(layer, demand)
        part.tiers.stats.skipped += sum(demand[c] for c in step.absent)
        dropped += [base + c for c in step.absent]
        steps.append(PartStep(part, base, step))
    if dropped:
        keep = torch.ones(comp.num_chunks, dtype=torch.bool, device=sel.chunk.device)
        keep[torch.tensor(dropped, dtype=torch.long, device=keep.device)] = False
        idx = keep[sel.chunk.long()].nonzero().squeeze(1)
        sel = Selections(sel.req[idx], sel.kv_head[idx], sel.chunk[idx])
    return sel, steps


def later_passes(
    steps: list[PartStep],
    sel: Selections,
    launch: Callable[[Any, Selections], tuple[torch.Tensor, torch.Tensor]],
    o_sel: torch.Tensor,
    lse_sel: torch.Tensor,
    num_chunks: int,  # the composition's: chunk ids of `sel` are below it
) -> None:
    """Passes 1.. of parts whose routed chunks outnumber their slots: each admitted after
    the launch before it, its selections computed by ``launch(part, sub)`` and written over
    their rows of ``o_sel`` / ``lse_sel`` (the first launch saw those chunks absent)."""
    from moska.library.tiers import chunk_rows

    for ps in steps:
        for i in range(1, len(ps.step.passes)):
            ps.part.tiers.admit_pass(ps.step, i)
            idx = chunk_rows(sel, ps.step.passes[i], num_chunks, ps.base)
            o, lse = launch(ps.part, Selections(sel.req[idx], sel.kv_head[idx], sel.chunk[idx]))
            o_sel.index_copy_(0, idx, o.to(o_sel.dtype))
            lse_sel.index_copy_(0, idx, lse.to(lse_sel.dtype))


def finish(steps: list[PartStep]) -> None:
    """After the layer's launches: each part's skip swap and fetch for the layer above."""
    for ps in steps:
        ps.part.tiers.finish(ps.step)


def refresh_table(table: Any, tiered: tuple, layer: int) -> None:
    """Point ``table``'s spans of tiered parts (part, base, first row of its slots in the
    pool) at ``layer``'s slots: the slot table's rows shifted by the first row (in place;
    queued launches that read the table before are ordered before it on the stream)."""
    for part, base, row in tiered:
        starts, ends = part.tiers.tables[layer]
        span = slice(base, base + part.num_chunks)
        table.starts[span].copy_(starts + row)
        table.ends[span].copy_(ends + row)
