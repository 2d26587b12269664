"""Copies stored keys and values of every layer into a paged cache, the keys re-rotated
by a per-token position difference, in one launch (SemShareKV's reuse of a reference's KV).

For each layer l and token t: k_cache[l, dst[t]] <- rotate(k_src[l, src[t]], cos[t], sin[t])
and v_cache[l, dst[t]] <- v_src[l, src[t]], where rotate is the rotate-half product on the
[Hkv, D] row in fp32 (cos/sin [T, D/2] fp32, computed by the caller in float64 so that
position differences of thousands keep fp32 accuracy). In PyTorch this is a gather, ~10
elementwise passes over fp32 copies of every layer's keys, a cast and two scatters: on an
H200 ~2 ms for 4,500 tokens of a 16-layer model, where the bytes moved take ~0.1 ms.
"""

import torch
import triton
import triton.language as tl


# T (tokens moved) is any count: not specialized on its divisibility by 16, which compiled a
# second variant inside the first blend of the other kind (~0.15-0.2 s of one request's TTFT
# on an H200, once per engine: the session-18 steady runs' one outlier each)
@triton.jit(do_not_specialize=["T"])
def _rope_scatter_kernel(
    ks_ptr,  # [L, N, H, D] source keys (rotated at their old positions)
    vs_ptr,  # [L, N, H, D]
    kc_ptr,  # [L, slots, H, D] cache
    vc_ptr,
    src_ptr,  # [T] int64: source token index
    dst_ptr,  # [T] int64: cache slot
    cos_ptr,  # [T, D/2] fp32
    sin_ptr,
    T,
    stride_sl,  # source layer stride (elements)
    stride_st,  # source token stride
    stride_cl,  # cache layer stride
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    HALF: tl.constexpr = D // 2
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < T
    src = tl.load(src_ptr + t, mask=ok, other=0).to(tl.int64)
    dst = tl.load(dst_ptr + t, mask=ok, other=0).to(tl.int64)
    offs_h = tl.arange(0, H)
    offs_d = tl.arange(0, HALF)
    inner = offs_h[None, :, None] * D + offs_d[None, None, :]  # [1, H, D/2]
    okb = ok[:, None, None]
    s_row = layer * stride_sl + src[:, None, None] * stride_st + inner  # [BT, H, D/2]
    c_row = layer * stride_cl + dst[:, None, None] * (H * D) + inner
    cs = t[:, None, None] * HALF + offs_d[None, None, :]
    c = tl.load(cos_ptr + cs, mask=okb, other=0.0)
    s = tl.load(sin_ptr + cs, mask=okb, other=0.0)
    k1 = tl.load(ks_ptr + s_row, mask=okb, other=0.0).to(tl.float32)
    k2 = tl.load(ks_ptr + s_row + HALF, mask=okb, other=0.0).to(tl.float32)
    out_ty = kc_ptr.dtype.element_ty
    tl.store(kc_ptr + c_row, (k1 * c - k2 * s).to(out_ty), mask=okb)
    tl.store(kc_ptr + c_row + HALF, (k2 * c + k1 * s).to(out_ty), mask=okb)
    v1 = tl.load(vs_ptr + s_row, mask=okb, other=0.0)
    v2 = tl.load(vs_ptr + s_row + HALF, mask=okb, other=0.0)
    tl.store(vc_ptr + c_row, v1.to(vc_ptr.dtype.element_ty), mask=okb)
    tl.store(vc_ptr + c_row + HALF, v2.to(vc_ptr.dtype.element_ty), mask=okb)


def supported(k_src: torch.Tensor) -> bool:
    """Power-of-two heads and head_dim (>= 2), each layer's [N, H, D] contiguous."""
    _, _, h, d = k_src.shape
    pow2 = h & (h - 1) == 0 and d >= 2 and d & (d - 1) == 0
    return pow2 and k_src.stride(3) == 1 and k_src.stride(2) == d


def rope_scatter(
    k_src: torch.Tensor,  # [L, N, H, D]
    v_src: torch.Tensor,  # [L, N, H, D], same strides as k_src
    k_cache: torch.Tensor,  # [L, slots, H, D] (a paged cache viewed flat), contiguous
    v_cache: torch.Tensor,
    src: torch.Tensor,  # [T] int64: which source tokens
    dst: torch.Tensor,  # [T] int64: their cache slots
    cos: torch.Tensor,  # [T, D/2] fp32: of each token's position difference
    sin: torch.Tensor,
    *,
    block_t: int | None = None,
) -> None:
    """k_cache[:, dst] = rotate(k_src[:, src]) and v_cache[:, dst] = v_src[:, src]; no host
    sync. Indices are not checked (the caller's plan guarantees them)."""
    layers, _, h, d = k_src.shape
    t = src.shape[0]
    if v_src.shape != k_src.shape or v_src.stride() != k_src.stride() or not supported(k_src):
        raise ValueError(
            f"rope_scatter: k {tuple(k_src.shape)} / v {tuple(v_src.shape)} need equal "
            "strides, power-of-two heads and head_dim, contiguous [H, D] rows"
        )
    if k_cache.shape[0] != layers or k_cache.shape[2:] != (h, d) or not k_cache.is_contiguous():
        raise ValueError(f"rope_scatter: cache {tuple(k_cache.shape)} does not hold [{h}, {d}]")
    if v_cache.shape != k_cache.shape or not v_cache.is_contiguous():
        raise ValueError("rope_scatter: the k and v caches must match and be contiguous")
    if dst.shape != (t,) or cos.shape != (t, d // 2) or sin.shape != cos.shape:
        raise ValueError("rope_scatter: src, dst, cos and sin must cover the same tokens")
    if t == 0:
        return
    # a tile of tokens moves block_t * H * D elements of each of k and v: ~4K elements per
    # program keeps its fp32 halves, cos and sin in registers (8 tokens at 8 x 64)
    block_t = block_t or max(1, min(16, 4096 // (h * d)))
    grid = (triton.cdiv(t, block_t), layers)
    _rope_scatter_kernel[grid](
        k_src, v_src, k_cache, v_cache, src, dst,
        cos.float().contiguous(), sin.float().contiguous(), t,
        k_src.stride(0), k_src.stride(1), k_cache.stride(0),
        H=h, D=d, BLOCK_T=block_t,
    )  # fmt: skip
