"""Building blocks of the Llama family: RMSNorm, rotary embedding (with scaling), SwiGLU MLP."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from moska.model.config import RopeScaling

if TYPE_CHECKING:
    from moska.kernel_ops import KernelOps


class RMSNorm(nn.Module):
    """y = w * (x / rms(x)), normalised in fp32 and cast back before the weight (as HF does).

    `fused(x, residual, ops)` is the decoder's form: (norm(x + residual), x + residual), by
    the engine's kernel table (`moska/kernel_ops.py`: one Triton launch, or the reference)."""

    def __init__(self, dim: int, eps: float, *, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(in_dtype)

    def fused(self, x: torch.Tensor, residual: torch.Tensor | None, ops: KernelOps):
        """(norm(x + residual), x + residual); residual None means zero (the first layer)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps), x
        return ops.rms_norm(x, self.weight, self.eps, residual=residual)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] fp32 (CPU), with linear or llama3 scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [D/2]
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        # Wavelengths longer than the original context are stretched by `factor`, shorter ones
        # above high_freq are kept, and the band in between is interpolated smoothly.
        old_len = scaling.original_max_position_embeddings
        low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
        assert old_len is not None and low is not None and high is not None  # config checks
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE at arbitrary integer positions (no position table, no length limit)."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling, *, device=None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        if device is not None and torch.device(device).type != "meta":
            inv_freq = inv_freq.to(device)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2] fp32

    def reset_inv_freq(self) -> None:
        """Recompute the buffer in place (after `to_empty` or a dtype cast of the module)."""
        fresh = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        self.inv_freq = fresh.to(self.inv_freq.device)

    def cos_sin_half(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int -> (cos, sin) each [T, D/2] fp32, for `kernels/rotary.py`."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, D/2]
        return freqs.cos(), freqs.sin()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """positions [T] int -> (cos, sin) each [T, 1, D] in `dtype` (computed in fp32)."""
        return tuple(
            torch.cat((c, c), dim=-1).to(dtype)[:, None, :] for c in self.cos_sin_half(positions)
        )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D], cos/sin [T, 1, D] -> x rotated, same shape and dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are one fused projection [2 * I, H]."""

    def __init__(self, hidden: int, intermediate: int, *, dtype=None, device=None) -> None:
        super().__init__()
        self.intermediate = intermediate
        kw = {"bias": False, "dtype": dtype, "device": device}
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)

    def forward(self, x: torch.Tensor, ops: KernelOps) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))  # gate ++ up [T, 2I]
