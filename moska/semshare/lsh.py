"""Banded random-hyperplane LSH over token features: which stored reference prompts share
many near-identical tokens with a new prompt.

A token's signature is the sign pattern of its feature against `bands * rows` random
hyperplanes (SimHash): two features at angle theta agree on one bit with probability
1 - theta / pi, so on a band of `rows` bits with p ** rows, and collide in at least one band
with 1 - (1 - p ** rows) ** bands: an S-curve that keeps near duplicates (cos 0.95: 0.80 at
8 x 16) and drops the merely similar (cos 0.8: 0.19). A prompt's vote for a reference is the
share of its tokens that collide with any of the reference's tokens in any band.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

_MAX_RUNS = 8  # sorted runs kept before they are merged into one


class LSHIndex:
    """Band buckets -> the references with a token in them, as sorted tensors.

    Each added reference appends a run (its sorted unique bucket keys, its integer id);
    a lookup binary-searches every run (at most `_MAX_RUNS`, then they merge into one), so
    adding a 5K-token prompt is a few tensor ops instead of ~40K Python set insertions and a
    lookup is O(1) host syncs instead of a Python loop over buckets. Removal forgets the id;
    its entries are dropped at the next merge."""

    def __init__(self, dim: int, bands: int = 8, rows: int = 16, seed: int = 0) -> None:
        if bands < 1 or not 1 <= rows <= 62:
            raise ValueError(f"LSH needs bands >= 1 and 1 <= rows <= 62, got {bands}, {rows}")
        self.dim, self.bands, self.rows = dim, bands, rows
        gen = torch.Generator().manual_seed(seed)
        self.planes = torch.randn(dim, bands * rows, generator=gen)  # [F, bands*rows] fp32
        self._planes_on: dict[torch.device, torch.Tensor] = {}  # copies on other devices
        self._weights = 2 ** torch.arange(rows, dtype=torch.int64)  # [rows]
        self._keys: dict[Hashable, torch.Tensor] = {}  # reference -> its sorted bucket keys
        self._ids: dict[Hashable, int] = {}  # reference -> its id in the runs
        self._refs: dict[int, Hashable] = {}  # the inverse, live references only
        self._next_id = 0
        self._runs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (sorted keys, ids) [K]
        self._dead = 0  # entries of removed references still in the runs

    def signatures(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, F] -> bucket keys [N, bands] int64 (band-tagged, so bands never mix)."""
        assert features.dim() == 2 and features.shape[1] == self.dim, tuple(features.shape)
        planes = self._planes_on.get(features.device)
        if planes is None:  # copied once per device: a host-to-device copy waits on the stream
            planes = self._planes_on.setdefault(features.device, self.planes.to(features.device))
        bits = (features.float() @ planes > 0).cpu().long()  # [N, bands*rows]
        codes = (bits.view(-1, self.bands, self.rows) * self._weights).sum(-1)  # [N, bands]
        return codes * self.bands + torch.arange(self.bands)  # [N, bands]

    def add(self, ref: Hashable, features: torch.Tensor) -> None:
        """Index reference `ref` by its token features [N, F]."""
        if ref in self._keys:
            return
        keys = torch.unique(self.signatures(features))  # sorted
        rid = self._next_id
        self._next_id += 1
        self._keys[ref], self._ids[ref], self._refs[rid] = keys, rid, ref
        self._runs.append((keys, torch.full_like(keys, rid)))
        if len(self._runs) > _MAX_RUNS:
            self._merge()

    def remove(self, ref: Hashable) -> None:
        keys = self._keys.pop(ref, None)
        if keys is None:
            return
        del self._refs[self._ids.pop(ref)]
        self._dead += keys.numel()
        if self._dead > sum(k.numel() for k, _ in self._runs) // 2:
            self._merge()

    def _merge(self) -> None:
        """One sorted run of the live references' entries."""
        if not self._refs:
            self._runs, self._dead = [], 0
            return
        keys = torch.cat([k for k, _ in self._runs])
        ids = torch.cat([i for _, i in self._runs])
        live = torch.isin(ids, torch.tensor(list(self._refs), dtype=torch.int64))
        keys, order = keys[live].sort(stable=True)
        self._runs, self._dead = [(keys, ids[live][order])], 0

    def __len__(self) -> int:
        return len(self._keys)

    def votes(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, counts): for each live reference with an entry among the unique `keys`
        [Q] int64, how many of them it has."""
        hit_ids = []
        for run_keys, run_ids in self._runs:
            lo = torch.searchsorted(run_keys, keys)
            hi = torch.searchsorted(run_keys, keys, right=True)
            n = hi - lo  # entries per query key in this run
            starts = torch.repeat_interleave(lo - (n.cumsum(0) - n), n)
            hit_ids.append(run_ids[starts + torch.arange(starts.numel())])
        ids, counts = torch.unique(torch.cat(hit_ids), return_counts=True)
        live = torch.isin(ids, torch.tensor(list(self._refs), dtype=torch.int64))
        return ids[live], counts[live]

    def candidates(
        self, features: torch.Tensor, top: int = 1, sample: int | None = 1024
    ) -> list[tuple[Hashable, float]]:
        """The `top` references with the most colliding tokens, as (ref, share of the
        new prompt's tokens that collide with it), best first. Votes come from at most
        `sample` evenly spaced tokens (a share estimated from 1,024 tokens is within a few
        percent of the whole prompt's)."""
        if not self._refs:
            return []
        if sample is not None and features.shape[0] > sample:
            rows = torch.linspace(0, features.shape[0] - 1, sample).round().long()
            features = features[rows.to(features.device)]
        sigs = self.signatures(features)  # [N, bands]
        # shortlist by the buckets of up to 256 of the tokens (most votes; ties: oldest),
        # then score the shortlisted references exactly on every sampled token
        step = max(1, sigs.shape[0] // 256)
        ids, counts = self.votes(torch.unique(sigs[::step]))
        order = torch.argsort(-counts, stable=True)[: max(top, 4)]  # ids ascend: oldest first
        shortlist = [self._refs[i] for i in ids[order].tolist()]
        scored = [(ref, _share_in(sigs, self._keys[ref])) for ref in shortlist]
        scored.sort(key=lambda x: -x[1])
        return scored[:top]


def _share_in(sigs: torch.Tensor, keys: torch.Tensor) -> float:
    """Share of rows of sigs [N, bands] with any key in the sorted `keys` (binary search)."""
    idx = torch.searchsorted(keys, sigs).clamp_(max=keys.numel() - 1)
    return float((keys[idx] == sigs).any(dim=1).float().mean())
