"""FP8 (e4m3) library KV: quantize a layer's K or V pool with one fp32 scale per
(token, KV head), or coarser, and dequantize it back. Plain PyTorch.

Why e4m3 with amax scales: e4m3 keeps 3 mantissa bits (a relative rounding error of at
most 2^-4) over a range of 2^-6..448 (subnormals to 2^-9), so once a group's largest
magnitude is mapped to 448 every value of the group keeps its relative precision; only
values 2^15 below the group's largest lose it (to subnormals, then zero). The granularity
is the trade between that range and what a kernel must read: a (chunk, KV head) scale is
one number per group the grouped kernel already handles (K's folds into the logit scale,
V's into the output); a (token, KV head) scale costs 8 bytes per key and head beside the
256 of its e4m3 K and V at D = 128 (3%), multiplied onto the score column and the weight.
Measured on the quality model (bench/fp8_quality.py, bench/results/fp8_quality.json,
4,600 held-out tokens, against the bf16 library): top-1 agreement 0.9887 (all chunks) and
0.9891 (top-4) per chunk, 0.9946 and 0.9917 per token, loss within 0.05% for both; per
chunk misses the 0.99 target, so libraries store per-token scales (`LIBRARY_GRANULARITY`).
A few tokens (a file's first, the attention sinks) hold keys and values far larger than
their chunk's others, and a per-chunk scale set by them rounds the rest more coarsely.
It is K that needs them: with V per 128-row "block" and K per token, the FP8 tensor-core
program with q in two terms keeps 0.9932 / 0.9922, K per block 0.9892 / 0.9879
(bench/results/fp8_quality_mixed.json); such a library is read with one V scale per key
block (library/fp8_mma.v_block_rows). Libraries still store both per token (the upcast
program's quality with V per block is unmeasured).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
# one scale per KV head per: layer, chunk, token, or `block`: per BLOCK_ROWS rows from each
# chunk's start, stored per token ([S, Hkv], constant over a block): every reader of per-token
# scales reads it unchanged, and the FP8 tensor-core program told so (`fp8_scale_block`) loads
# one scale per key block, at per-chunk speed. Its quality is per-chunk's, not per-token's
# (top-1 0.9883 / 0.9886 vs 0.9941 / 0.9932, bench/results/fp8_quality_block.json)
GRANULARITIES = ("layer", "chunk", "token", "block")
BLOCK_ROWS = 128
LIBRARY_GRANULARITY = "token"  # what libraries store (see the module docstring)
_ROWS_PER_STEP = 1 << 16  # quantize in slices: an fp32 copy of a whole pool can be GiBs


class QuantizedKV(NamedTuple):
    """``data`` [S, Hkv, D] float8_e4m3fn and ``scale`` fp32: [1, Hkv] (layer), [C, Hkv]
    (chunk) or [S, Hkv] (token); the value is ``data.float() * scale`` of its row."""

    data: torch.Tensor
    scale: torch.Tensor


def _row_chunks(chunk_offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[S] int64: the chunk of every row of a pool cut at ``chunk_offsets`` [C + 1]."""
    offs = chunk_offsets.to(torch.int64)
    assert int(offs[0]) == 0 and int(offs[-1]) == num_rows, (offs, num_rows)
    return torch.repeat_interleave(torch.arange(offs.numel() - 1, device=offs.device), offs.diff())


def row_scales(
    scale: torch.Tensor, chunk_offsets: torch.Tensor, num_rows: int, granularity: str
) -> torch.Tensor:
    """[S, Hkv] fp32: the scale of every row, whatever the granularity."""
    if granularity in ("token", "block"):
        return scale
    if granularity == "layer":
        return scale.expand(num_rows, -1)
    return scale[_row_chunks(chunk_offsets.to(scale.device), num_rows)]


def compute_scales(
    x: torch.Tensor,  # [S, Hkv, D]
    chunk_offsets: torch.Tensor,  # [C + 1] int
    granularity: str = LIBRARY_GRANULARITY,
) -> torch.Tensor:
    """fp32 amax / 448 per group (1.0 for an all-zero group, whose values stay 0)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    s, hkv = x.shape[0], x.shape[1]
    amax = torch.empty(s, hkv, dtype=torch.float32, device=x.device)  # [S, Hkv]
    for r in range(0, s, _ROWS_PER_STEP):
        amax[r : r + _ROWS_PER_STEP] = x[r : r + _ROWS_PER_STEP].abs().amax(-1).float()
    if granularity == "layer":
        amax = amax.amax(0, keepdim=True)  # [1, Hkv]
    elif granularity == "block":  # per BLOCK_ROWS rows from each chunk's start, per row
        offs = chunk_offsets.to(device=x.device, dtype=torch.int64)
        rows = torch.arange(s, device=x.device)
        start = offs[_row_chunks(offs, s)]  # each row's chunk start
        blk = start + (rows - start) // BLOCK_ROWS * BLOCK_ROWS  # each row's block start
        ids = torch.unique_consecutive(blk, return_inverse=True)[1]  # block number per row
        bmax = torch.zeros(int(ids[-1]) + 1 if s else 0, hkv, device=x.device)
        bmax.scatter_reduce_(0, ids[:, None].expand(-1, hkv), amax, "amax")
        amax = bmax[ids]  # [S, Hkv], constant over a block
    elif granularity == "chunk":
        c = chunk_offsets.numel() - 1
        rows = _row_chunks(chunk_offsets.to(x.device), s)
        amax = torch.zeros(c, hkv, dtype=torch.float32, device=x.device).scatter_reduce_(
            0, rows[:, None].expand(-1, hkv), amax, "amax"
        )  # [C, Hkv]
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize(
    x: torch.Tensor,  # [S, Hkv, D] fp16/bf16/fp32
    chunk_offsets: torch.Tensor,  # [C + 1] int
    granularity: str = LIBRARY_GRANULARITY,
) -> QuantizedKV:
    """Round ``x / scale`` to the nearest e4m3 value (saturating at +-448)."""
    if x.dim() != 3 or not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"x must be a [S, Hkv, D] fp16/bf16/fp32 pool, got {x.dtype} {x.shape}")
    scale = compute_scales(x, chunk_offsets, granularity)
    rs = row_scales(scale, chunk_offsets, x.shape[0], granularity)  # [S, Hkv]
    data = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    for r in range(0, x.shape[0], _ROWS_PER_STEP):
        sl = slice(r, r + _ROWS_PER_STEP)
        y = x[sl].float() / rs[sl, :, None]
        data[sl] = y.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return QuantizedKV(data, scale)


def dequantize(
    qkv: QuantizedKV,
    chunk_offsets: torch.Tensor,  # [C + 1] int
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [S, Hkv, D]
    """``data * scale`` of every row, in ``dtype``; the granularity is read off the scale."""
    data, scale = qkv
    s, c = data.shape[0], chunk_offsets.numel() - 1
    if scale.shape[0] == c:  # (also right where a chunk is one row or the layer one chunk)
        granularity = "chunk"
    elif scale.shape[0] == s:
        granularity = "token"
    elif scale.shape[0] == 1:
        granularity = "layer"
    else:
        raise ValueError(f"scale {tuple(scale.shape)} fits no granularity of {s} rows, {c} chunks")
    rs = row_scales(scale, chunk_offsets, s, granularity)
    return (data.float() * rs[:, :, None]).to(dtype)


def hadamard(d: int, seed: int = 0) -> torch.Tensor:
    """[d, d] fp32 orthonormal randomized Hadamard matrix R (random signs on the rows of a
    Sylvester Hadamard matrix / sqrt(d)); d a power of two. A library may store K rotated
    (k R) when its reader rotates q alike (q R): q.k = (q R).(k R), and the rotation spreads
    a few large channels over all, so coarser e4m3 scales keep their precision (FA3's
    incoherent processing). Measured (bench/results/fp8_quality_rot_chunk.json, 6,136
    tokens): K and V per 128-row block with K rotated, one-term q through the FP8 tensor-core
    program, top-1 0.9925 / 0.9914 vs bf16 (unrotated per chunk 0.9863 / 0.9853)."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"head dim {d} is not a power of two")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return signs.float()[:, None] * h / d**0.5
