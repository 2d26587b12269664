"""SwiGLU's activation: silu(gate) * up from the fused gate/up projection, in one pass.

Input [T, 2I] holds gate in columns [0, I) and up in [I, 2I) (the fused projection's
output); the result is [T, I]. silu is computed in fp32 and rounded to the input dtype
before the product, as PyTorch's `F.silu(gate) * up` rounds.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, o_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inter
    g = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    u = tl.load(x_ptr + row * stride_x + inter + offs, mask=ok, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(o_ptr + row * stride_o + offs, (s * u).to(o_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] (gate ++ up) -> silu(gate) * up [T, I], x's dtype."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_and_mul wants a [T, 2I] tensor with contiguous rows, got "
                         f"{tuple(x.shape)} with strides {x.stride()}")  # fmt: skip
    t, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(t, inter, device=x.device, dtype=x.dtype)
    if t:
        block = min(2048, triton.next_power_of_2(inter))
        grid = (t, triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](x, out, inter, x.stride(0), out.stride(0), BLOCK=block)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
