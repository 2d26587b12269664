"""Input checks and output buffers of the paged attention kernels."""

import torch


def check_inputs(q, k_cache, v_cache, block_tables, seq_lens) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"q must be [T,Hq,D] and k_cache [num_blocks,block_size,Hkv,D]; got {tuple(q.shape)}, {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)}"
        )
    d, bs, hkv = q.shape[2], k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"head_dim differs: q {d}, k_cache {k_cache.shape[3]}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if bs < 1 or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two, got {bs}")
    if hkv == 0 or q.shape[1] % hkv:
        raise ValueError(f"Hq={q.shape[1]} must be a multiple of Hkv={hkv}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be fp16, bf16 or fp32, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1)")
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
