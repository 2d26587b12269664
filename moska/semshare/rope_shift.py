"""Moving a rotated key to a new position: RoPE rotations compose, R(p + d) = R(d) R(p).

The reference store keeps keys **rotated**, exactly as the paged cache holds them (that is
where they are copied from, and the attention kernels read rotated keys). A matched token
whose reference sat at position p and now sits at position p' gets its key rotated by
d = p' - p, per token. Rotating by d is the same rotate-half product the model applies at
position d, with cos/sin computed in fp32 from the model's own inverse frequencies (any
linear or llama3 scaling included), so re-rotation equals rotating the unrotated key at
p' (tested to fp32 rel err < 1e-5). On a GPU the blend applies the same cos/sin in one
fused gather-rotate-scatter launch (`moska.kernels.rope_scatter`).
"""

from __future__ import annotations

import torch


def delta_cos_sin(
    delta: torch.Tensor,  # [T] int64 position differences
    inv_freq: torch.Tensor,  # [D/2] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, D/2] fp32 of delta * inv_freq, the angles in float64: a difference
    of 5,000 positions is 5,000 radians at the fastest frequency, where fp32's spacing
    (5e-4) would already show in the rotated key."""
    freqs = delta.to(inv_freq.device).double()[:, None] * inv_freq.double()[None, :]
    return freqs.cos().float(), freqs.sin().float()


def rotate_by(
    k: torch.Tensor,  # [..., T, H, D] rotated keys
    delta: torch.Tensor,  # [T] int64: new position - old position, per token
    inv_freq: torch.Tensor,  # [D/2] fp32, the model's RotaryEmbedding.inv_freq
) -> torch.Tensor:
    """Keys rotated by `delta` more positions; same shape and dtype (math in fp32)."""
    assert k.shape[-3] == delta.shape[0], (tuple(k.shape), tuple(delta.shape))
    assert k.shape[-1] == 2 * inv_freq.shape[0], (tuple(k.shape), tuple(inv_freq.shape))
    cos, sin = delta_cos_sin(delta.to(k.device), inv_freq.to(k.device))
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]
    kf = k.float()
    half = k.shape[-1] // 2
    k1, k2 = kf[..., :half], kf[..., half:]
    # rotate-half on the halves: (k1 cos - k2 sin, k2 cos + k1 sin), no [.., D] temporaries
    return torch.cat((k1 * cos - k2 * sin, k2 * cos + k1 * sin), dim=-1).to(k.dtype)
