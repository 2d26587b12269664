"""Residency-biased routing for a tiered library: prefer a GPU-resident chunk when its score
is within epsilon of a non-resident one.

Why: at B = 256 the batch's top-k selections cover nearly every chunk each step, so exact
tiering moves the whole non-resident share of the library every step and no eviction or
scheduling keeps up (bench/results/tiers_h200.json, moska/bench/tier_floor.py). Routing
that leans toward what is resident cuts the bytes a step misses at the source. It changes
which chunks a request reads, so its output: the quality cost is measured on the quality
model before anything serves with it (bench/tier_bias_quality.py).

Epsilon is in units of the request's own score spread (the standard deviation of its chunk
scores), so one value means the same for any scorer and model: a resident chunk whose score
is at most eps x std below a non-resident one's is taken before it. eps = 0 is the plain
top-k (exactly); eps = inf routes among resident chunks only (when there are at least k).
"""

from __future__ import annotations

import math

import torch


def bias_to_resident(scores: torch.Tensor, resident: torch.Tensor, eps: float) -> torch.Tensor:
    """scores [..., C] (a request's chunk scores; any leading dims), resident [C] or
    broadcastable bool -> biased scores to take the top-k of. Non-finite scores are kept
    (an `always` chunk's +inf stays first)."""
    if eps < 0:
        raise ValueError(f"the residency bias eps must be >= 0, got {eps}")
    if eps == 0:
        return scores
    if math.isinf(eps):
        return scores.masked_fill(~resident, float("-inf"))
    finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    spread = finite.float().std(dim=-1, keepdim=True).to(scores.dtype)
    return scores + eps * spread * resident.to(scores.dtype)


def topk_biased(scores: torch.Tensor, resident: torch.Tensor, eps: float, k: int):
    """Indices [..., k] of the residency-biased top-k of `scores` [..., C]."""
    return bias_to_resident(scores, resident, eps).topk(k, dim=-1).indices
