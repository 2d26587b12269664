"""Input checks and output buffers of the paged attention kernels."""

import torch

from .qkv_checks import check_qkv


def check_inputs(q, k_cache, v_cache, block_tables, seq_lens) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"q must be [T,Hq,D] and k_cache [num_blocks,block_size,Hkv,D]; got {tuple(q.shape)}, {tuple(k_cache.shape)}"
        )
    check_qkv(q, k_cache, v_cache, "k_cache", "v_cache")
    bs = k_cache.shape[1]
    if bs < 1 or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two, got {bs}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.stride(1) != 1:
        raise ValueError(
            f"block_tables must be a row-major int32 [B, max_blocks], got {block_tables.dtype}"
        )
    b = block_tables.shape[0]
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (b,):
        raise ValueError(
            f"seq_lens must be int32 [B]={b}, got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    devs = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {devs}")


def outputs(out, t_total, hq, d, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    if out is None:
        return (
            torch.empty(t_total, hq, d, device=device, dtype=dtype),
            torch.empty(t_total, hq, device=device, dtype=torch.float32),
        )
    o, lse = out
    if o.shape != (t_total, hq, d) or o.dtype != dtype or not o.is_contiguous():
        raise ValueError(
            f"out o must be contiguous {dtype} [{t_total},{hq},{d}], got {o.dtype} {tuple(o.shape)}"
        )
    if lse.shape != (t_total, hq) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(
            f"out lse must be contiguous float32 [{t_total},{hq}], got {lse.dtype} {tuple(lse.shape)}"
        )
    return o, lse
