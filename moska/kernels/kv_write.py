"""Writes a step's new keys and values into the paged KV cache, both in one launch.

For each token t: k_cache[slot[t]] <- k[t] and v_cache[slot[t]] <- v[t] ([Hkv, D] rows,
cast to the cache's dtype), where the caches are one layer's [blocks * block_size, Hkv, D]
views. k and v may be strided views (e.g. of the fused qkv projection's output); only
their last dimension must be contiguous. In a decode step this replaces two index_copy_
launches per layer with one.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write_kernel(
    k_ptr,  # [T, Hkv, D]
    v_ptr,
    kc_ptr,  # [slots, Hkv, D] contiguous
    vc_ptr,
    slot_ptr,  # [T] int64
    H,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    ok = (offs_h < H)[:, None]
    slot = tl.load(slot_ptr + t).to(tl.int64)
    dst = slot * H * D + offs_h[:, None] * D + offs_d[None, :]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=ok)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=ok)
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=ok)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=ok)


def kv_write(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [slots, Hkv, D] contiguous
    v_cache: torch.Tensor,  # [slots, Hkv, D] contiguous
    slot_mapping: torch.Tensor,  # [T] int64, each < slots
) -> None:
    """k_cache[slot_mapping] = k and v_cache[slot_mapping] = v, in one launch."""
    t, h, d = k.shape
    if v.shape != k.shape or slot_mapping.shape != (t,):
        raise ValueError(
            f"kv_write: k {tuple(k.shape)}, v {tuple(v.shape)} and slots "
            f"{tuple(slot_mapping.shape)} disagree"
        )
    if k_cache.shape[1:] != (h, d) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"kv_write: caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not hold "
            f"[{h}, {d}] rows"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("kv_write: the caches must be contiguous")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("kv_write: k and v need their head dimension contiguous")
    if d & (d - 1):
        raise ValueError(f"kv_write supports power-of-two head dims, got {d}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_write: slot_mapping must be int32/int64, got {slot_mapping.dtype}")
    if t == 0:
        return
    block_h = min(triton.next_power_of_2(h), max(1, 4096 // d))
    grid = (t, triton.cdiv(h, block_h))
    _kv_write_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping, h,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        D=d, BLOCK_H=block_h,
    )  # fmt: skip


def kv_write_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Plain PyTorch: the same writes with index_copy_."""
    k_cache.index_copy_(0, slot_mapping.long(), k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping.long(), v.to(v_cache.dtype))
