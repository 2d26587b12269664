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

from collections import Counter
from collections.abc import Hashable

import torch


class LSHIndex:
    """Band buckets -> the references with a token in them; plain dicts, exact removal."""

    def __init__(self, dim: int, bands: int = 8, rows: int = 16, seed: int = 0) -> None:
        if bands < 1 or not 1 <= rows <= 62:
            raise ValueError(f"LSH needs bands >= 1 and 1 <= rows <= 62, got {bands}, {rows}")
        self.dim, self.bands, self.rows = dim, bands, rows
        gen = torch.Generator().manual_seed(seed)
        self.planes = torch.randn(dim, bands * rows, generator=gen)  # [F, bands*rows] fp32
        self._weights = 2 ** torch.arange(rows, dtype=torch.int64)  # [rows]
        self._buckets: dict[int, set[Hashable]] = {}
        self._keys: dict[Hashable, torch.Tensor] = {}  # reference -> its sorted bucket keys

    def signatures(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, F] -> bucket keys [N, bands] int64 (band-tagged, so bands never mix)."""
        assert features.dim() == 2 and features.shape[1] == self.dim, tuple(features.shape)
        planes = self.planes.to(features.device)
        bits = (features.float() @ planes > 0).cpu().long()  # [N, bands*rows]
        codes = (bits.view(-1, self.bands, self.rows) * self._weights).sum(-1)  # [N, bands]
        return codes * self.bands + torch.arange(self.bands)  # [N, bands]

    def add(self, ref: Hashable, features: torch.Tensor) -> None:
        """Index reference `ref` by its token features [N, F]."""
        if ref in self._keys:
            return
        keys = torch.unique(self.signatures(features))  # sorted
        for key in keys.tolist():
            self._buckets.setdefault(key, set()).add(ref)
        self._keys[ref] = keys

    def remove(self, ref: Hashable) -> None:
        for key in self._keys.pop(ref, torch.empty(0, dtype=torch.int64)).tolist():
            bucket = self._buckets[key]
            bucket.discard(ref)
            if not bucket:
                del self._buckets[key]

    def __len__(self) -> int:
        return len(self._keys)

    def candidates(
        self, features: torch.Tensor, top: int = 1, sample: int | None = 1024
    ) -> list[tuple[Hashable, float]]:
        """The `top` references with the most colliding tokens, as (ref, share of the
        new prompt's tokens that collide with it), best first. Votes come from at most
        `sample` evenly spaced tokens (the lookups are Python: a 5K-token prompt would spend
        ~10 ms on them; a share estimated from 1,024 tokens is within a few percent)."""
        if sample is not None and features.shape[0] > sample:
            rows = torch.linspace(0, features.shape[0] - 1, sample).round().long()
            features = features[rows.to(features.device)]
        sigs = self.signatures(features)  # [N, bands]
        # shortlist by the buckets of up to 256 of the tokens (a few thousand dict lookups),
        # then score the shortlisted references exactly on every sampled token
        votes: Counter = Counter()
        step = max(1, sigs.shape[0] // 256)
        for key in torch.unique(sigs[::step]).tolist():
            votes.update(self._buckets.get(key, ()))
        shortlist = [ref for ref, _ in votes.most_common(max(top, 4))]
        scored = [(ref, _share_in(sigs, self._keys[ref])) for ref in shortlist]
        scored.sort(key=lambda x: -x[1])
        return scored[:top]


def _share_in(sigs: torch.Tensor, keys: torch.Tensor) -> float:
    """Share of rows of sigs [N, bands] with any key in the sorted `keys` (binary search)."""
    idx = torch.searchsorted(keys, sigs).clamp_(max=keys.numel() - 1)
    return float((keys[idx] == sigs).any(dim=1).float().mean())
