"""Hot-chunk replicas on an engine's shared-KV ranks, and the per-rank load they even out.

Under skewed (Zipf-like) routing a few chunks get most readers, and the shared rank that
holds them does most of each layer's attention while the others wait. As EPLB does for hot
experts, rank 0 counts each chunk's readers over a window of forwards (selections per
chunk, on the device: one bincount per attention call), plans extra copies of the hottest
chunks on the least-loaded ranks (`ChunkPlacement.with_replicas`, `slots_per_rank` copies
at most per rank) and sends the new placement to the shared ranks (PLACE_LIBRARY: each
reads the chunks it now holds from the store and answers); then `destinations` deals a
replicated chunk's readers to its holders in turn. Exact: which rank attends a
(request, chunk) does not change the LSE merge.

`RankLoads` is the counter: per forward, the selections and query rows each shared rank
was sent (from the all-to-all's header, which the client reads on the host anyway).
"""

from __future__ import annotations

from collections import deque

import torch


class RankLoads:
    """Per-shared-rank load of the last `history` forwards with library rows."""

    def __init__(self, num_ranks: int, history: int = 1024) -> None:
        self.num_ranks = num_ranks
        self.selections: deque[list[int]] = deque(maxlen=history)  # per forward, per rank
        self.rows: deque[list[int]] = deque(maxlen=history)
        self.total_selections = [0] * num_ranks  # since startup (a counter)
        self.total_rows = [0] * num_ranks

    def start_forward(self) -> None:
        self.selections.append([0] * self.num_ranks)
        self.rows.append([0] * self.num_ranks)

    def add_call(self, rows: list[int], selections: list[int]) -> None:
        """One attention call's exchange: rows and selections sent to each shared rank."""
        if not self.selections:
            self.start_forward()
        for r in range(self.num_ranks):
            self.selections[-1][r] += selections[r]
            self.rows[-1][r] += rows[r]
            self.total_selections[r] += selections[r]
            self.total_rows[r] += rows[r]

    def clear(self) -> None:
        self.selections.clear()
        self.rows.clear()

    def report(self) -> dict:
        """Mean selections and rows per rank per forward, and the imbalance (max / mean
        over ranks) of the mean forward and of the worst one."""
        steps = [s for s in self.selections if sum(s)]
        if not steps:
            return {"forwards": 0}
        n, m = len(steps), self.num_ranks
        mean = [sum(s[r] for s in steps) / n for r in range(m)]
        rows = [sum(x[r] for x in self.rows) / max(1, len(self.rows)) for r in range(m)]
        return {
            "forwards": n,
            "selections_per_rank_per_forward": [round(x, 1) for x in mean],
            "rows_per_rank_per_forward": [round(x, 1) for x in rows],
            "imbalance_mean_forward": round(max(mean) / (sum(mean) / m), 3),
            "imbalance_worst_forward": round(max(max(s) / (sum(s) / m) for s in steps), 3),
        }


class ChunkReads:
    """Readers (selections) per chunk of each library build since it was loaded or last
    re-placed, counted on the device."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}  # build id -> [C] int64
        self.forwards: dict[str, int] = {}  # build id -> forwards that read it

    def add(self, build_id: str, chunk: torch.Tensor, num_chunks: int) -> None:
        got = torch.bincount(chunk.long(), minlength=num_chunks)
        if build_id in self.counts:
            self.counts[build_id] += got
        else:
            self.counts[build_id] = got

    def forward(self, build_id: str) -> int:
        """Count one forward reading `build_id`; returns how many there were."""
        self.forwards[build_id] = self.forwards.get(build_id, 0) + 1
        return self.forwards[build_id]

    def load(self, build_id: str, num_chunks: int) -> list[float]:
        c = self.counts.get(build_id)
        return [0.0] * num_chunks if c is None else c.double().tolist()

    def drop(self, build_id: str) -> None:
        self.counts.pop(build_id, None)
        self.forwards.pop(build_id, None)
