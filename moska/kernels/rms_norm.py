"""RMSNorm with an optional fused residual add: one pass over each row.

`rms_norm(x, w, eps)` = w * (x / rms(x)), the normalisation in fp32 and cast back to x's
dtype before the weight, as Hugging Face's Llama does. With `residual`, the row is first
summed s = x + residual in x's dtype (the decoder's residual stream) and the kernel returns
(norm(s), s): the add, the norm and the weight cost one read of each input and two writes,
where the PyTorch composition launches about seven kernels per call.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, H]
    r_ptr,  # [T, H] residual in, or x_ptr when none
    w_ptr,  # [H]
    o_ptr,  # [T, H] normed out
    s_ptr,  # [T, H] residual out (x + residual), or o_ptr when none
    H,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_s,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RES:
        x = x + tl.load(r_ptr + row * stride_r + offs, mask=ok, other=0.0)  # in x's dtype
        tl.store(s_ptr + row * stride_s + offs, x, mask=ok)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps)
    y = (xf * inv).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * stride_o + offs, (y * w).to(o_ptr.dtype.element_ty), mask=ok)


def rms_norm(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) [T, H], or (norm(x + residual), x + residual) when `residual` is given."""
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm wants x [T, H] and weight [H], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if x.stride(1) != 1 or weight.stride(0) != 1:
        raise ValueError("rms_norm needs rows of x and the weight contiguous")
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(f"residual is {residual.dtype}, x is {x.dtype}")
    t, h = x.shape
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))
    summed = torch.empty_like(x) if residual is not None else out
    if t:
        block = triton.next_power_of_2(h)
        # fmt: off
        _rms_norm_kernel[(t,)](
            x, residual if residual is not None else x, weight, out, summed, h, eps,
            x.stride(0), (residual if residual is not None else x).stride(0),
            out.stride(0), summed.stride(0),
            HAS_RES=residual is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 512)),
        )
        # fmt: on
    return out if residual is None else (out, summed)


def rms_norm_ref(x, weight, eps, residual=None):
    """Plain PyTorch, as Hugging Face's LlamaRMSNorm (with the residual add before it)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = weight * y
    return out if residual is None else (out, x)
