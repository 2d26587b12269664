"""Token-level fuzzy matching of a new prompt against one reference prompt.

A token's feature is its input embedding joined with the mean embedding of the `window`
tokens before it, both unit-normalised, so the cosine of two features is the mean of the
token similarity and the context similarity. A token of the new prompt is matched to the
reference token with the highest feature cosine when that is >= `threshold`: the same token
in the same few-token context scores 1; the same token after a renamed identifier about
0.5 + 0.5 * (shared context); a different token rarely reaches 0.9. KV depends on the
context before a token, which is why a bare embedding match (SemShareKV's) is not enough
on code, where `self`, `(` and `:` are everywhere.

Cost on a GPU (a 5K-token prompt, a 1B model: F = 4,096): features are a gather and a
few elementwise passes (the context is a `window`-wide sliding sum, not a prompt-long
cumulative sum, whose scan took 1.8 ms on an H200); matching is one [N, F] x [F, M]
product in fp16 on tensor cores (~0.2 ms; in fp32 it took 4 ms) and a row max.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from moska.semshare.blend import row_bucket

_MAX_SIM = 1 << 26  # similarity entries per block ([b, M] at a time): 128 MiB in fp16


def inverse_norms(embed_weight: torch.Tensor) -> torch.Tensor:
    """[V] fp32: 1 / |row| of the embedding table (as F.normalize divides, eps 1e-12).
    Computed once per model (`SemanticReuse`), so features normalise a gather of N rows
    instead of computing N norms from scratch at every request."""
    return 1.0 / embed_weight.float().norm(dim=-1).clamp_min(1e-12)


def token_features(
    embed_weight: torch.Tensor,  # [V, H] the model's input embedding
    token_ids: torch.Tensor,  # [N] int64
    window: int = 4,
    *,
    inv_norm: torch.Tensor | None = None,  # [V] fp32 from `inverse_norms` (else computed)
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[N, 2H] unit rows in `dtype` (math in fp32): (embedding, mean of the `window`
    previous embeddings, each normalised) / sqrt 2. The positions before the prompt count
    as a fixed start vector."""
    assert window >= 1
    ids = token_ids.to(embed_weight.device, non_blocking=True)  # staged: no stream wait
    e = embed_weight[ids].float()  # [N, H]
    scale = inv_norm[ids] if inv_norm is not None else 1.0 / e.norm(dim=-1).clamp_min(1e-12)
    e = e * scale[:, None]  # [N, H] unit rows
    n, h = e.shape
    padded = torch.cat([e.new_full((window, h), h**-0.5), e])  # [w + N, H]
    # [N, H]: the sum of the w embeddings before each token (a sliding window, one kernel)
    ctx = padded.unfold(0, window, 1)[:n].sum(-1)
    out = torch.cat([e, F.normalize(ctx, dim=-1)], dim=-1)  # [N, 2H]
    return out.mul_(0.5**0.5).to(dtype)


# cosines this close to the best count as a tie (fp16 products: ~1e-3; fp32 ~1e-7)
_TIE = {torch.float16: 2e-3, torch.float32: 1e-5}


class TokenMatch(NamedTuple):
    ref_pos: torch.Tensor  # [N] int64: matched reference position, -1 when unmatched
    similarity: torch.Tensor  # [N] fp32: cosine to the nearest reference token

    @property
    def num_matched(self) -> int:
        return int((self.ref_pos >= 0).sum())


def match_tokens(
    new_feats: torch.Tensor,  # [N, F] unit rows
    ref_feats: torch.Tensor,  # [M, F] unit rows
    threshold: float,
    granule: int = 1,
) -> TokenMatch:
    """Each new token's nearest reference token by feature cosine, kept when >= threshold.
    On a GPU the product is in fp16 (cosines of unit rows to ~1e-3; fp32 accumulation), on
    the CPU in fp32. No host sync. `granule` > 1: both sides padded with zero rows to a
    `row_bucket`, so the product's shape repeats across prompt lengths (cuBLAS picks an
    algorithm per new shape, ms of host time on an H200); padded columns are sliced off
    before the max and padded rows after it: the same matches."""
    dtype = torch.float16 if new_feats.is_cuda else torch.float32
    new = new_feats.to(dtype)
    ref = ref_feats.to(new_feats.device, dtype)
    n, m = new.shape[0], ref.shape[0]
    if granule > 1:  # (a length already at its bucket is not copied)
        pad_n, pad_m = row_bucket(n, 1 << 62, granule) - n, row_bucket(m, 1 << 62, granule) - m
        new = F.pad(new, (0, 0, 0, pad_n)) if pad_n else new
        ref = F.pad(ref, (0, 0, 0, pad_m)) if pad_m else ref
    block = max(1, _MAX_SIM // max(1, ref.shape[0]))
    best_sim, best_pos = [], []
    for i in range(0, new.shape[0], block):  # one block up to 13K x 5K
        s, j = (new[i : i + block] @ ref.T)[:, :m].max(dim=1)  # [b]
        best_sim.append(s)
        best_pos.append(j)
    sim = torch.cat(best_sim).float() if len(best_sim) > 1 else best_sim[0].float()
    pos = torch.cat(best_pos) if len(best_pos) > 1 else best_pos[0]
    sim, pos = sim[:n], pos[:n]
    # a tie (to the product's rounding) goes to the token at the same position: in an equal
    # context it is the likeliest to share the longer context too, and a run of such tokens
    # keeps its blocks as they are (`sharing.py`); `max` gave the first of equal scores
    k = min(n, m)
    same = (new[:k].float() * ref[:k].float()).sum(-1) >= sim[:k] - _TIE[dtype]
    pos[:k] = torch.where(same, torch.arange(k, device=pos.device), pos[:k])
    pos = torch.where(sim >= threshold, pos, -1)
    return TokenMatch(pos, sim)
