"""Input checks, output buffers and TMA descriptors of the grouped shared-chunk attention."""

from typing import NamedTuple

import torch
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .qkv_checks import check_qkv


class ChunkTable(NamedTuple):
    """Where each chunk's rows are in a KV pool: chunk c is rows ``starts[c] : ends[c]``.

    Chunk ids stay logical (the router's), while the rows may sit in any slot of a pool (a
    tiered library's GPU chunk cache); an absent chunk has ``ends[c] == starts[c]`` and
    attends to nothing (o = 0, lse = -inf). An all-resident library's table is two views
    of its chunk offsets (``chunk_table``), so passing offsets costs no copy."""

    starts: torch.Tensor  # [C] int32
    ends: torch.Tensor  # [C] int32


def chunk_table(chunks: "torch.Tensor | ChunkTable") -> ChunkTable:
    """A ChunkTable from chunk offsets [C + 1] int32 (views: offsets[:-1], offsets[1:]) or
    a ChunkTable (returned as is)."""
    if isinstance(chunks, ChunkTable):
        return chunks
    if chunks.dtype != torch.int32 or chunks.dim() != 1 or chunks.numel() < 1:
        raise ValueError(
            f"chunk_offsets must be 1-D int32 [C+1], got {chunks.dtype} {tuple(chunks.shape)}"
        )
    return ChunkTable(chunks[:-1], chunks[1:])


def outputs(out, shape, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    if out is None:
        return torch.empty(shape, device=device, dtype=dtype), torch.empty(
            shape[:-1], device=device, dtype=torch.float32
        )
    o, lse = out
    if o.shape != shape or o.dtype != dtype or not o.is_contiguous() or o.device != device:
        raise ValueError(
            f"out o must be contiguous {dtype} {shape} on {device}, got {o.dtype} {tuple(o.shape)}"
        )
    if lse.shape != shape[:-1] or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(
            f"out lse must be contiguous float32 {shape[:-1]}, got {lse.dtype} {tuple(lse.shape)}"
        )
    return o, lse


def check_inputs(q, k_pool, v_pool, table: ChunkTable, sel) -> None:
    if q.dim() != 3 or k_pool.dim() != 3:
        raise ValueError(
            f"q must be [B,Hq,D] and k_pool [S_total,Hkv,D]; got {tuple(q.shape)}, {tuple(k_pool.shape)}"
        )
    check_qkv(q, k_pool, v_pool, "k_pool", "v_pool", fp8_kv=True)
    for name, t in zip(ChunkTable._fields, table):
        if t.dtype != torch.int32 or t.dim() != 1 or t.shape != table.starts.shape:
            raise ValueError(
                f"chunk table {name} must be int32 [C] like starts; got {t.dtype} {tuple(t.shape)}"
            )
    n = sel.req.shape
    for name in ("req", "kv_head", "chunk"):
        t = getattr(sel, name)
        if t.dtype != torch.int32 or t.dim() != 1 or t.shape != n:
            raise ValueError(
                f"sel.{name} must be int32 [N] like sel.req; got {t.dtype} {tuple(t.shape)}"
            )
    devs = {t.device for t in (q, k_pool, v_pool, *table, sel.req, sel.kv_head, sel.chunk)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {devs}")


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def fp8_kernel_args(q, k_pool, v_pool, kv_scales, table: ChunkTable, fp8_dot: bool) -> dict:
    """The kernel's e4m3 arguments: scale pointers, their row stride and constexprs.
    An e4m3 pool needs (k_scale, v_scale) fp32, [S_total, Hkv] (per pool row, addressed like
    the rows: a tiered library keeps them beside its slots) or [C, Hkv] (per chunk, by
    chunk id); other pools take none."""
    kv_fp8 = k_pool.dtype == torch.float8_e4m3fn
    if not kv_fp8:
        if kv_scales is not None or fp8_dot:
            raise ValueError(
                f"kv_scales and fp8_dot are for float8_e4m3fn pools, not {k_pool.dtype}"
            )
        return {}
    if kv_scales is None:
        raise ValueError("float8_e4m3fn k_pool/v_pool need kv_scales=(k_scale, v_scale)")
    per_token = kv_scales[0].shape[0] == k_pool.shape[0]
    shape = (k_pool.shape[0] if per_token else table.starts.numel(), k_pool.shape[1])
    for name, t in zip(("k_scale", "v_scale"), kv_scales):
        if t.dtype != torch.float32 or tuple(t.shape) != shape or t.stride() != (shape[1], 1):
            raise ValueError(
                f"{name} must be contiguous float32 [S_total or C, Hkv], like k_scale {shape}; "
                f"got {t.dtype} {tuple(t.shape)}"
            )
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (8, 9):
        raise ValueError("e4m3 KV needs a GPU of compute capability 8.9+ (Ada, Hopper)")
    return {
        "k_scale_ptr": kv_scales[0],
        "v_scale_ptr": kv_scales[1],
        "stride_sc": shape[1],
        "KV_FP8": True,
        "FP8_DOT": bool(fp8_dot),
        "CDTYPE": _TL_DTYPES[q.dtype],
        "PER_TOKEN": per_token,
    }


def chunk_scale_args(q, chunk_scales, table: ChunkTable) -> dict:
    """The kernel's per-chunk softmax-scale arguments: `chunk_scales` fp32 [C] (a factor on
    `sm_scale` per chunk id, e.g. each composed part's APE 1/T) or None (one scale for all:
    the constexpr path of before, no load)."""
    if chunk_scales is None:
        return {}
    c = table.starts.numel()
    t = chunk_scales
    if t.dtype != torch.float32 or t.dim() != 1 or t.numel() != c or t.stride() != (1,):
        raise ValueError(
            f"chunk_scales must be contiguous float32 [C] = [{c}] (one factor per chunk id); "
            f"got {t.dtype} {tuple(t.shape)}"
        )
    if t.device != q.device:
        raise ValueError(f"chunk_scales is on {t.device}, q on {q.device}")
    return {"chunk_scale_ptr": t, "CHUNK_SCALE": True}


def tma_ok(k_pool: torch.Tensor, v_pool: torch.Tensor) -> bool:
    """TMA needs each token's heads contiguous (a 2-D [S, Hkv*D] view) and 16-byte alignment."""
    if k_pool.device.type == "cuda" and torch.cuda.get_device_capability(k_pool.device)[0] < 9:
        return False
    d, hkv, el = k_pool.shape[2], k_pool.shape[1], k_pool.element_size()
    return (
        all(
            t.stride(1) == d and (t.stride(0) * el) % 16 == 0 and t.data_ptr() % 16 == 0
            for t in (k_pool, v_pool)
        )
        and k_pool.stride(0) >= hkv * d
    )


def pool_descriptor(pool: torch.Tensor, block_n: int) -> TensorDescriptor:
    s, hkv, d = pool.shape
    return TensorDescriptor(pool, [s, hkv * d], [pool.stride(0), 1], [block_n, d])
