"""Checks of q against a K/V pair that every attention launcher shares."""

import torch


def check_qkv(q, k, v, k_name: str, v_name: str, *, fp8_kv: bool = False) -> None:
    """q [..., Hq, D] against k and v [..., Hkv, D] of the same shape: head_dim (a power of
    two >= 16), GQA ratio, one supported dtype, contiguous last dimensions. ``fp8_kv``: k
    and v may also both be float8_e4m3fn (scaled KV, upcast by the kernel)."""
    if v.shape != k.shape:
        raise ValueError(f"{v_name} {tuple(v.shape)} must match {k_name} {tuple(k.shape)}")
    d, hkv = q.shape[-1], k.shape[-2]
    if k.shape[-1] != d:
        raise ValueError(f"head_dim differs: q {d}, {k_name} {k.shape[-1]}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if hkv == 0 or q.shape[-2] % hkv:
        raise ValueError(f"Hq={q.shape[-2]} must be a multiple of Hkv={hkv}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be fp16, bf16 or fp32, got {q.dtype}")
    fp8 = fp8_kv and k.dtype == v.dtype == torch.float8_e4m3fn
    if not fp8 and (k.dtype != q.dtype or v.dtype != q.dtype):
        raise ValueError(f"q, {k_name}, {v_name} dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("q", q), (k_name, k), (v_name, v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1)")
