"""Plain-PyTorch references of the router's score kernels (`router_scores.py`,
`router_dense.py`): fp32, obviously correct, slow. q [B, Hq, D] -> scores [B, Hkv, C]."""

from __future__ import annotations

import torch


def mean_scores_ref(q: torch.Tensor, mean_keys: torch.Tensor) -> torch.Tensor:
    B, Hq, D = q.shape
    Hkv = mean_keys.shape[1]
    qg = q.float().reshape(B, Hkv, Hq // Hkv, D)
    return torch.einsum("bhgd,chd->bhgc", qg, mean_keys.float()).amax(dim=2)


def bound_scores_ref(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
    B, Hq, D = q.shape
    Hkv = key_min.shape[1]
    qg = q.float().reshape(B, Hkv, Hq // Hkv, 1, D)
    lo = qg * key_min.float().permute(1, 0, 2)[None, :, None]  # [B, Hkv, G, C, D]
    hi = qg * key_max.float().permute(1, 0, 2)[None, :, None]
    return torch.maximum(lo, hi).sum(-1).amax(dim=2)


def keymax_scores_ref(
    q: torch.Tensor, basis: torch.Tensor, lowrank_keys: torch.Tensor, chunk_offsets: torch.Tensor
) -> torch.Tensor:
    B, Hq, D = q.shape
    Hkv = basis.shape[0]
    qr = torch.einsum("bhgd,hdr->bhgr", q.float().reshape(B, Hkv, Hq // Hkv, D), basis.float())
    offs = chunk_offsets.tolist()
    out = torch.empty(B, Hkv, len(offs) - 1, dtype=torch.float32, device=q.device)
    for c in range(len(offs) - 1):
        keys = lowrank_keys[offs[c] : offs[c + 1]].float()  # [L, Hkv, R]
        logits = torch.einsum("bhgr,lhr->bhgl", qr, keys)
        out[:, :, c] = logits.amax(dim=(2, 3))
    return out
