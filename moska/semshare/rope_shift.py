"""Moving a rotated key to a new position: RoPE rotations compose, R(p + d) = R(d) R(p).

The reference store keeps keys **rotated**, exactly as the paged cache holds them (that is
where they are copied from, and the attention kernels read rotated keys). A matched token
whose reference sat at position p and now sits at position p' gets its key rotated by
d = p' - p, per token. Rotating by d is the same rotate-half product the model applies at
position d, with cos/sin computed in fp32 from the model's own inverse frequencies (any
linear or llama3 scaling included), so re-rotation equals rotating the unrotated key at
p' (tested to fp32 rel err < 1e-5).
"""

from __future__ import annotations

import torch


def rotate_by(
    k: torch.Tensor,  # [..., T, H, D] rotated keys
    delta: torch.Tensor,  # [T] int64: new position - old position, per token
    inv_freq: torch.Tensor,  # [D/2] fp32, the model's RotaryEmbedding.inv_freq
) -> torch.Tensor:
    """Keys rotated by `delta` more positions; same shape and dtype (math in fp32)."""
    assert k.shape[-3] == delta.shape[0], (tuple(k.shape), tuple(delta.shape))
    assert k.shape[-1] == 2 * inv_freq.shape[0], (tuple(k.shape), tuple(inv_freq.shape))
    freqs = delta.to(k.device).double()[:, None] * inv_freq.to(k.device).double()[None, :]
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1).float()[:, None, :]  # [T, 1, D]
    sin = torch.cat((freqs.sin(), freqs.sin()), dim=-1).float()[:, None, :]
    kf = k.float()
    half = k.shape[-1] // 2
    rotated = torch.cat((-kf[..., half:], kf[..., :half]), dim=-1)
    return (kf * cos + rotated * sin).to(k.dtype)
