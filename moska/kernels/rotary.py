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
def _rotate(x_ptr, t, offs_h, H, stride_xt, stride_xh, c, s, HALF: tl.constexpr):
    offs_i = tl.arange(0, HALF)
    ok = (offs_h < H)[:, None]
    p1 = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_i[None, :]
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=ok, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=ok)
    tl.store(p2, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rope_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [T, Hkv, D]
    cos_ptr,  # [T, D/2] fp32
    sin_ptr,
    HQ,
    HKV,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_c,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # program (t, j): head block j of q for j < cdiv(HQ, BLOCK_H), else of k
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    q_blocks = tl.cdiv(HQ, BLOCK_H)
    offs_i = tl.arange(0, HALF)
    c = tl.load(cos_ptr + t * stride_c + offs_i)[None, :]
    s = tl.load(sin_ptr + t * stride_c + offs_i)[None, :]
    if j < q_blocks:
        offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate(q_ptr, t, offs_h, HQ, stride_qt, stride_qh, c, s, HALF)
    else:
        offs_h = (j - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate(k_ptr, t, offs_h, HKV, stride_kt, stride_kh, c, s, HALF)


def rotary_inplace(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [T, D/2] fp32
    sin: torch.Tensor,  # [T, D/2] fp32
) -> None:
    """Rotate q and k in place by the per-token angles whose cos/sin are given (one launch)."""
    t, hq, d = q.shape
    if k.dim() != 3 or k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("rotary_inplace needs the head dimension of q and k contiguous")
    if d % 2 or d & (d - 1):
        raise ValueError(f"rotary_inplace supports power-of-two head dims, got {d}")
    for name, c in (("cos", cos), ("sin", sin)):
        if c.shape != (t, d // 2) or c.dtype != torch.float32 or c.stride(1) != 1:
            raise ValueError(f"{name} must be fp32 [T, D/2] = [{t}, {d // 2}], got "
                             f"{c.dtype} {tuple(c.shape)}")  # fmt: skip
    if cos.stride() != sin.stride():
        raise ValueError("cos and sin must have the same strides")
    if t == 0:
        return
    hkv = k.shape[1]
    block_h = min(triton.next_power_of_2(max(hq, hkv)), max(1, 4096 // d))
    grid = (t, triton.cdiv(hq, block_h) + triton.cdiv(hkv, block_h))
    _rope_kernel[grid](
        q, k, cos, sin, hq, hkv, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos.stride(0), HALF=d // 2, BLOCK_H=block_h,
    )  # fmt: skip


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch in fp32: x [T, H, D], cos/sin [T, D/2] -> rotated x, x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
