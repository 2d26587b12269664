"""Rotary position embedding (rotate-half convention) on q and k in place, in one launch.

For each token t, head h and i < D/2, with c = cos[t, i] and s = sin[t, i]:
    x[t, h, i]       <- x[t, h, i] * c - x[t, h, i + D/2] * s
    x[t, h, i + D/2] <- x[t, h, i + D/2] * c + x[t, h, i] * s
cos and sin [T, D/2] are fp32 (computed once per forward from the positions, with the
model's RoPE scaling); the rotation runs in fp32 and rounds once. q and k may be strided
views (e.g. of the fused qkv projection's output); only their last dimension must be
contiguous.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr,  # [T, H, D]
    cos_ptr,  # [T, D/2] fp32
    sin_ptr,
    H,
    stride_xt,
    stride_xh,
    stride_c,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, HALF)
    ok = (offs_h < H)[:, None]
    c = tl.load(cos_ptr + t * stride_c + offs_i)[None, :]
    s = tl.load(sin_ptr + t * stride_c + offs_i)[None, :]
    p1 = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_i[None, :]
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=ok, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=ok)
    tl.store(p2, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    t, h, d = x.shape
    if x.stride(2) != 1:
        raise ValueError("rotary_inplace needs the head dimension of q and k contiguous")
    if d % 2 or d & (d - 1):
        raise ValueError(f"rotary_inplace supports power-of-two head dims, got {d}")
    if t == 0:
        return
    block_h = min(triton.next_power_of_2(h), max(1, 4096 // d))
    grid = (t, triton.cdiv(h, block_h))
    _rope_kernel[grid](
        x, cos, sin, h, x.stride(0), x.stride(1), cos.stride(0), HALF=d // 2, BLOCK_H=block_h
    )


def rotary_inplace(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [T, D/2] fp32
    sin: torch.Tensor,  # [T, D/2] fp32
) -> None:
    """Rotate q and k in place by the per-token angles whose cos/sin are given."""
    t, _, d = q.shape
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree")
    for name, c in (("cos", cos), ("sin", sin)):
        if c.shape != (t, d // 2) or c.dtype != torch.float32 or c.stride(1) != 1:
            raise ValueError(f"{name} must be fp32 [T, D/2] = [{t}, {d // 2}], got "
                             f"{c.dtype} {tuple(c.shape)}")  # fmt: skip
    if cos.stride() != sin.stride():
        raise ValueError("cos and sin must have the same strides")
    _launch(q, cos, sin)
    _launch(k, cos, sin)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch in fp32: x [T, H, D], cos/sin [T, D/2] -> rotated x, x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
