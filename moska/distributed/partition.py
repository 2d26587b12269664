"""Which shared-KV rank holds which chunk of a library, and where each selected chunk's
query rows go.

Chunks are to shared-KV ranks what experts are to expert-parallel ranks: every chunk has a
primary holder chosen by chunk id (``c % M``, so neighbouring chunks, which a prompt often
reads together, land on different ranks), and a hot chunk may be replicated on more ranks
(as EPLB replicates hot experts) so that its readers are spread over several ranks instead
of queueing on one. Plain Python and small tensor ops: no collective, no CUDA call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from moska.kernels.selections import Selections


class PlacementError(ValueError):
    """A chunk placement that cannot be built or used; the message says what to change."""


@dataclass(frozen=True)
class ChunkPlacement:
    """``holders[c]``: the shared ranks (0 .. num_ranks-1, primary first) holding chunk c."""

    num_chunks: int
    num_ranks: int
    holders: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if self.num_chunks < 1 or self.num_ranks < 1:
            raise PlacementError(
                f"need at least one chunk and one shared rank, got {self.num_chunks} chunks "
                f"and {self.num_ranks} ranks"
            )
        if len(self.holders) != self.num_chunks:
            raise PlacementError(f"holders lists {len(self.holders)} chunks, not {self.num_chunks}")
        for c, hs in enumerate(self.holders):
            if not hs or len(set(hs)) != len(hs) or not all(0 <= r < self.num_ranks for r in hs):
                raise PlacementError(
                    f"chunk {c}: holders {hs} must be distinct ranks in [0, {self.num_ranks})"
                )

    @classmethod
    def by_chunk_id(cls, num_chunks: int, num_ranks: int) -> ChunkPlacement:
        """Chunk c on rank c % num_ranks; a rank may hold no chunk when C < M."""
        return cls(num_chunks, num_ranks, tuple((c % num_ranks,) for c in range(num_chunks)))

    def chunks_of(self, rank: int) -> tuple[int, ...]:
        """The chunks (ascending ids) shared rank ``rank`` holds, replicas included."""
        return tuple(c for c, hs in enumerate(self.holders) if rank in hs)

    @property
    def max_replicas(self) -> int:
        return max(len(hs) for hs in self.holders)

    def holder_table(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(table [C, max_replicas] int64, count [C] int64): row c lists chunk c's holders,
        padded by repeating the primary."""
        r = self.max_replicas
        rows = [list(hs) + [hs[0]] * (r - len(hs)) for hs in self.holders]
        table = torch.tensor(rows, dtype=torch.int64, device=device)
        count = torch.tensor([len(hs) for hs in self.holders], dtype=torch.int64, device=device)
        return table, count

    def with_replicas(self, chunk_load: Sequence[float], slots_per_rank: int) -> ChunkPlacement:
        """This placement plus up to ``slots_per_rank`` extra chunk copies on each rank, given
        to the hottest chunks (greedy, as EPLB does for experts).

        ``chunk_load[c]``: how many readers chunk c had over some window (e.g. the counts of
        a few steps' selections). A chunk's load is split evenly over its holders; each round
        copies one of the busiest rank's chunks (the largest load per holder that helps) to the
        least-loaded rank with a free slot that lacks it, while that lowers the busiest load.
        """
        if len(chunk_load) != self.num_chunks:
            raise PlacementError(
                f"chunk_load has {len(chunk_load)} entries, need {self.num_chunks}"
            )
        if slots_per_rank < 0:
            raise PlacementError(f"slots_per_rank must be >= 0, got {slots_per_rank}")
        holders = [list(hs) for hs in self.holders]
        free = [slots_per_rank] * self.num_ranks
        load = [float(x) for x in chunk_load]

        def rank_loads() -> list[float]:
            out = [0.0] * self.num_ranks
            for c, hs in enumerate(holders):
                for r in hs:
                    out[r] += load[c] / len(hs)
            return out

        while True:
            loads = rank_loads()
            busiest = max(range(self.num_ranks), key=lambda x: loads[x])
            candidates = []  # (load per holder, chunk, target rank), largest share first
            for c, hs in enumerate(holders):
                targets = [r for r in range(self.num_ranks) if free[r] and r not in hs]
                if busiest in hs and targets and load[c] > 0:
                    r = min(targets, key=lambda x: (loads[x], x))
                    candidates.append((load[c] / len(hs), c, r))
            for _, c, r in sorted(candidates, reverse=True):
                holders[c].append(r)
                after = rank_loads()
                if max(after) <= max(loads) and after[busiest] < loads[busiest]:
                    free[r] -= 1
                    break
                holders[c].pop()  # no gain: try the next chunk
            else:
                break
        return ChunkPlacement(self.num_chunks, self.num_ranks, tuple(tuple(h) for h in holders))


class Destinations(NamedTuple):
    """Where one unique rank's selections go (``B`` its rows, ``N`` its selections)."""

    rank: torch.Tensor  # [N] int64, shared rank of each selection
    pairs: torch.Tensor  # [P] int64, unique (dest, req) pairs as dest * B + req, ascending
    pair_of_sel: torch.Tensor  # [N] int64, index into pairs of each selection


def destinations(sel: Selections, num_rows: int, placement: ChunkPlacement) -> Destinations:
    """The shared rank of each selection. A replicated chunk's readers (distinct requests)
    are dealt to its holders in turn, so that they split evenly; every KV head of one
    (request, chunk) goes to the same holder, so a request's query row is sent once per rank.
    """
    dev = sel.chunk.device
    table, count = placement.holder_table(dev)
    chunk, req = sel.chunk.long(), sel.req.long()
    b = max(1, num_rows)
    if placement.max_replicas == 1:
        rank = table[chunk, 0]
    else:
        cr, inv = torch.unique(chunk * b + req, return_inverse=True)  # (chunk, req) ascending
        cr_chunk = cr // b
        first = torch.searchsorted(cr_chunk, cr_chunk)  # first pair of the same chunk
        turn = torch.arange(cr.numel(), device=dev) - first
        rank = table[cr_chunk, turn % count[cr_chunk]][inv]
    pairs, pair_of_sel = torch.unique(rank * b + req, return_inverse=True)
    return Destinations(rank, pairs, pair_of_sel)


def rank_loads(sel: Selections, num_rows: int, placement: ChunkPlacement) -> dict[str, list[int]]:
    """Per shared rank: ``selections`` (query-head groups x chunks it attends: its attention
    work, chunks being of one length) and ``rows`` (distinct query rows it receives)."""
    d = destinations(sel, num_rows, placement)
    m = placement.num_ranks
    b = max(1, num_rows)
    return {
        "selections": torch.bincount(d.rank, minlength=m).tolist(),
        "rows": torch.bincount(d.pairs // b, minlength=m).tolist(),
    }
