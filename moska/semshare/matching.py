"""Token-level fuzzy matching of a new prompt against one reference prompt.

A token's feature is its input embedding joined with the mean embedding of the `window`
tokens before it, both unit-normalised, so the cosine of two features is the mean of the
token similarity and the context similarity. A token of the new prompt is matched to the
reference token with the highest feature cosine when that is >= `threshold`: the same token
in the same few-token context scores 1; the same token after a renamed identifier about
0.5 + 0.5 * (shared context); a different token rarely reaches 0.9. KV depends on the
context before a token, which is why a bare embedding match (SemShareKV's) is not enough
on code, where `self`, `(` and `:` are everywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

_BLOCK = 2048  # new-prompt rows per similarity block: [_BLOCK, M] fp32 at a time


def token_features(
    embed_weight: torch.Tensor,  # [V, H] the model's input embedding
    token_ids: torch.Tensor,  # [N] int64
    window: int = 4,
) -> torch.Tensor:
    """[N, 2H] fp32 unit rows: (embedding, mean of the `window` previous embeddings) / sqrt 2.
    The positions before the prompt count as a fixed start vector."""
    assert window >= 1
    ids = token_ids.to(embed_weight.device)
    e = F.normalize(embed_weight[ids].float(), dim=-1)  # [N, H]
    h = e.shape[1]
    start = torch.full((window, h), h**-0.5, device=e.device)  # [w, H]
    padded = torch.cat([start, e])  # [w + N, H]
    csum = torch.cat([torch.zeros(1, h, device=e.device), padded.cumsum(0)])  # [w + N + 1, H]
    n = e.shape[0]
    idx = torch.arange(n, device=e.device)
    ctx = csum[idx + window] - csum[idx]  # [N, H]: sum of the w embeddings before each token
    feats = torch.cat([e, F.normalize(ctx, dim=-1)], dim=-1)  # [N, 2H]
    return feats * 0.5**0.5


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
) -> TokenMatch:
    """Each new token's nearest reference token by feature cosine, kept when >= threshold."""
    best_sim, best_pos = [], []
    ref = ref_feats.to(new_feats.device, torch.float32)
    for i in range(0, new_feats.shape[0], _BLOCK):
        sim = new_feats[i : i + _BLOCK].float() @ ref.T  # [b, M]
        s, j = sim.max(dim=1)
        best_sim.append(s)
        best_pos.append(j)
    sim = torch.cat(best_sim)
    pos = torch.cat(best_pos)
    pos = torch.where(sim >= threshold, pos, torch.full_like(pos, -1))
    return TokenMatch(pos.long(), sim)
