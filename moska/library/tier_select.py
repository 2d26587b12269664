"""A tiered library's step plan (`TierStep`) and the selection subsets of its passes: which
selections read which chunks, and which absent chunks a skipping step fetches (the swap).
Split from library/tiers.py (the chunk caches)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moska.kernels.selections import Selections


@dataclass
class TierStep:
    """One layer's routed chunks of a tiered library, staged for its launch(es)
    (``ChunkTiers.stage``): ``passes`` of chunk ids (the first admitted), under "skip" the
    ``absent`` routed chunks this step drops; ``demand``: selections per routed chunk."""

    layer: int
    passes: list[list[int]]
    absent: list[int]
    demand: dict[int, int]
    skip: bool


def chunk_rows(sel: Selections, chunks: list[int], num_chunks: int, base: int = 0):
    """Indices of the selections of `sel` whose chunk is `base` + one of `chunks` (the chunk
    ids of `sel` are below `num_chunks`)."""
    keep = torch.zeros(num_chunks, dtype=torch.bool, device=sel.chunk.device)
    if chunks:
        keep[torch.tensor(chunks, dtype=torch.long, device=keep.device) + base] = True
    return keep[sel.chunk.long()].nonzero().squeeze(1)


def _swap_plan(absent: list[int], present: list[int], demand: dict[int, int], slots: int):
    """(chunks to fetch, chunks to keep) after a skipping step: the absent chunks by demand,
    and the resident chunks worth keeping. A resident chunk is given up for an absent one
    only when the absent one had strictly more selections (ties keep what is there: no
    churn under uniform routing). Slots not holding a routed chunk are free to take."""
    want = sorted(absent, key=lambda c: -demand[c])[:slots]
    keep = sorted(present, key=lambda c: demand[c])  # cheapest to give up first
    free = slots - len(present)
    give_up = 0
    for c in want[max(free, 0) :]:
        if give_up < len(keep) and demand[c] > demand[keep[give_up]]:
            give_up += 1
        else:
            break
    return want[: max(free, 0) + give_up], keep[give_up:]


def _subset(sel: Selections, chunks: list[int], num_chunks: int) -> Selections:
    idx = chunk_rows(sel, chunks, num_chunks)
    return Selections(sel.req[idx], sel.kv_head[idx], sel.chunk[idx])


def _empty(q_rows, sel, hkv):
    g, d = q_rows.shape[1] // hkv, q_rows.shape[2]
    n = sel.req.numel()
    o = torch.zeros(n, g, d, dtype=q_rows.dtype, device=q_rows.device)
    return o, torch.full((n, g), float("-inf"), device=q_rows.device), sel
