"""Key-max scores of every (request, chunk): the default router's one launch per layer.

``keymax_pair_scores`` takes a list of (request, chunk) pairs and builds a tile work list
from it (about 20 small torch launches before the kernel: searchsorted, cumsum, scatters).
When every request scores every chunk (the key-max scorer without a shortlist, i.e. the
default routing policy) the work list is regular: tile t is chunk t // tiles_per_chunk and
requests (t % tiles_per_chunk) * BLOCK_B onwards. This kernel computes that from its
program id, so the scores of a layer are ONE launch with no work-list tensors, written
straight into the [B, Hkv, C] table the top-k reads (contiguous: no permute copy).

Cost (what the floor of a routed step counts, moska/bench/floors.py): every low-rank key
read once from HBM (C * L * Hkv * r * 2 bytes; a chunk's tiles run together, so the
re-reads by its other tiles hit L2) and 2 * B * Hq * S * r FLOPs on the tensor cores.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .router_ref import keymax_scores_ref
from .router_rows import _dense_item, _keymax_rows, _load_q_rows
from .router_scores import _check, _pow2, _precision
from .runtime import triton_runs_on


class DenseTile(NamedTuple):
    """The key-max launch's tile: requests per tile, keys per block, warps, stages."""

    block_b: int = 32
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 4
    unroll: int = 1  # key blocks per loop iteration (2: two products before the maxima)


# 32 requests x 128-key blocks, 4 stages: the fastest of the session-13 sweep at B = 1,024
# (8B dims, rank 32, 256 chunks of 4,096: 3.99 ms against 4.17 ms for the 64-key blocks,
# 5 stages used until session 16); session 16 on the H200: 1-4% faster in the decode step,
# 1.3% in 7 rotated rounds of the scores alone (bench/results/router_tiles_h200_session16b
# .json): a small gain. The scores do not depend on the tile (each logit is the same
# K = r product; the max is exact; bitwise equal on the H200), nor do the chunks chosen.
TILE = DenseTile()
OLD_TILE = DenseTile(32, 64, 4, 5)  # before session 16 (the decode bench times both)
# Tiles by batch size, ((min_batch, tile), ...) ascending: a batch takes the entry with the
# largest min_batch <= B, and TILE where none applies (empty: TILE for every batch).
TILES_BY_BATCH: tuple[tuple[int, DenseTile], ...] = ()


def tile_for(batch: int) -> DenseTile:
    """The key-max tile of a batch of ``batch`` rows (TILES_BY_BATCH, else TILE; both read
    at call time, so a benchmark can time other tiles by setting them)."""
    tile = TILE
    for min_batch, t in TILES_BY_BATCH:
        if batch >= min_batch:
            tile = t
    return tile


# fmt: off
@triton.jit
def _keymax_dense_kernel(
    q_ptr,  # [B, Hq, D]
    basis_ptr,  # [Hkv, D, R]
    lk_ptr,  # [S_total, Hkv, R] low-rank keys
    offsets_ptr,  # [C + 1] int32
    out_ptr,  # [B, Hkv, C] fp32
    B, C, Hkv, G, D, R, TPC,
    stride_qb, stride_qh, stride_bh, stride_bd, stride_ks, stride_kh,
    stride_ob, stride_oh,
    PRECISION: tl.constexpr, EVEN_R: tl.constexpr, F16_ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PROJECTED: tl.constexpr,
    UNROLL: tl.constexpr = 1,
):
    # fmt: on
    # Items (tile t, head h), `_dense_item`; a smaller grid loops over them (keymax_programs)
    T = C * TPC
    for w in range(tl.program_id(0), T * Hkv, tl.num_programs(0)):
        h, chunk, req, req_ok, lo, hi = _dense_item(w, T, TPC, B, offsets_ptr, BLOCK_B)
        # fmt: off
        best = _keymax_rows(
            q_ptr, basis_ptr, lk_ptr, req, req_ok, h, lo, hi, G, D, R,
            stride_qb, stride_qh, stride_bh, stride_bd, stride_ks, stride_kh,
            PRECISION, EVEN_R, F16_ACC, BLOCK_B, BLOCK_G, BLOCK_D, BLOCK_R, BLOCK_N, PROJECTED,
            UNROLL,
        )
        # fmt: on
        o_ptrs = out_ptr + req.to(tl.int64) * stride_ob + h * stride_oh + chunk
        tl.store(o_ptrs, best, mask=req_ok)


# fmt: off
@triton.jit
def _project_kernel(
    q_ptr, basis_ptr, out_ptr, B, G, D, R,
    stride_qb, stride_qh, stride_bh, stride_bd, stride_ob, stride_oh,
    PRECISION: tl.constexpr, F16: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # fmt: on
    # rows of BLOCK_B requests x the G query heads of KV head h, projected on h's basis
    h = tl.program_id(1)
    req = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    req_ok = req < B
    q = _load_q_rows(q_ptr, stride_qb, stride_qh, req, req_ok, h, G, D, BLOCK_B, BLOCK_G, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    basis = tl.load(
        basis_ptr + h * stride_bh + offs_d[:, None] * stride_bd + offs_r[None, :],
        mask=(offs_d < D)[:, None] & (offs_r < R)[None, :],
        other=0.0,
    )
    qr = tl.dot(q, basis, input_precision=PRECISION)  # fp32 [BLOCK_B * BLOCK_G, BLOCK_R]
    if F16:  # fp16 operands: no inf (inf * 0 in the key-max dot would make a NaN)
        qr = tl.minimum(tl.maximum(qr, -65504.0), 65504.0)
    qr = tl.reshape(qr, (BLOCK_B, BLOCK_G, BLOCK_R))
    offs_g = tl.arange(0, BLOCK_G)
    ptrs = (out_ptr + req[:, None, None].to(tl.int64) * stride_ob
            + (h * G + offs_g)[None, :, None] * stride_oh + offs_r[None, None, :])  # fmt: skip
    ok = req_ok[:, None, None] & (offs_g < G)[None, :, None] & (offs_r < R)[None, None, :]
    tl.store(ptrs, qr.to(out_ptr.dtype.element_ty), mask=ok)


def project_queries(
    q: torch.Tensor, basis: torch.Tensor, lowrank_dtype: torch.dtype, use_triton: bool = True
) -> torch.Tensor:
    """q [B, Hq, D] onto each KV head's basis [Hkv, D, R] -> [B, Hq, R] in the low-rank
    keys' dtype (fp32 products, clamped to fp16's range for fp16): what every key-max tile
    would otherwise compute for itself, once per layer, in one launch."""
    B, Hq, D = q.shape
    Hkv, _, R = basis.shape
    G = Hq // Hkv
    if not use_triton or not triton_runs_on(q.device, _project_kernel):
        qg = q.float().view(B, Hkv, G, D)
        qr = torch.einsum("bhgd,hdr->bhgr", qg, basis.float())
        if lowrank_dtype == torch.float16:
            qr = qr.clamp(-65504.0, 65504.0)
        return qr.reshape(B, Hq, R).to(lowrank_dtype)
    q, basis = q.contiguous(), basis.contiguous()
    out = torch.empty(B, Hq, R, dtype=lowrank_dtype, device=q.device)
    block_g = _pow2(G)
    block_b = max(min(32, _pow2(B)), _pow2(16 // block_g))
    # fmt: off
    _project_kernel[(triton.cdiv(B, block_b), Hkv)](
        q, basis, out, B, G, D, R, q.stride(0), q.stride(1), basis.stride(0), basis.stride(1),
        out.stride(0), out.stride(1), PRECISION=_precision(q.dtype),
        F16=lowrank_dtype == torch.float16, BLOCK_B=block_b, BLOCK_G=block_g,
        BLOCK_D=_pow2(D, 16), BLOCK_R=_pow2(R, 16),
    )
    # fmt: on
    return out


def keymax_dense_scores(
    q: torch.Tensor,
    basis: torch.Tensor,
    lowrank_keys: torch.Tensor,
    chunk_offsets: torch.Tensor,
    block_b: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    max_programs: int | None = None,
    use_triton: bool = True,
    project_first: bool = True,
    unroll: int | None = None,
) -> torch.Tensor:
    """Key-max scores of every request and chunk: q [B, Hq, D] -> [B, Hkv, C] fp32.

    The same scores as ``keymax_pair_scores`` over all B * C pairs, in one launch. The tile
    arguments left None (``unroll``: key blocks per loop iteration) come from
    ``tile_for(B)``.
    ``project_first``: project the queries onto the bases once (``project_queries``, one
    batched matmul) instead of in every tile (each (chunk, request block) tile loaded its
    rows' full queries and the basis and projected them: 1/16 of its work at r = D/4 and,
    before the pipelined key loop, latency).
    ``max_programs`` caps the grid (the programs loop over the tiles); ``use_triton``
    False: the PyTorch reference.
    """
    given = (block_b, block_n, num_warps, num_stages, unroll)
    tile = tile_for(q.shape[0] if q.dim() == 3 else 0)
    tile = tile._replace(**{k: v for k, v in zip(DenseTile._fields, given) if v is not None})
    block_b, block_n, num_warps, num_stages, unroll = tile
    if unroll not in (1, 2):
        raise ValueError(f"unroll must be 1 or 2 key blocks per iteration, got {unroll}")
    q, basis = q.contiguous(), basis.contiguous()
    Hkv, D, R = basis.shape
    B, Hq = _check(q, basis, Hkv, D)
    G = Hq // Hkv
    assert lowrank_keys.dim() == 3 and lowrank_keys.shape[1:] == (Hkv, R)
    assert lowrank_keys.stride(2) == 1
    if lowrank_keys.dtype not in (torch.float16, q.dtype):
        raise ValueError(f"lowrank_keys must be fp16 or {q.dtype}, got {lowrank_keys.dtype}")
    C = chunk_offsets.numel() - 1
    if not use_triton or not triton_runs_on(q.device, _keymax_dense_kernel):
        return keymax_scores_ref(q, basis, lowrank_keys, chunk_offsets)
    out = torch.empty(B, Hkv, C, dtype=torch.float32, device=q.device)
    if B == 0 or C == 0:
        return out
    block_g = _pow2(G)
    block_b = max(min(_pow2(block_b), _pow2(B)), _pow2(16 // block_g))
    tpc = triton.cdiv(B, block_b)
    items = C * tpc * Hkv
    grid = (items if max_programs is None else max(1, min(items, max_programs)),)
    rows = project_queries(q, basis, lowrank_keys.dtype) if project_first else q
    # fmt: off
    _keymax_dense_kernel[grid](
        rows, basis, lowrank_keys, chunk_offsets, out, B, C, Hkv, G, D, R, tpc,
        rows.stride(0), rows.stride(1), basis.stride(0), basis.stride(1),
        lowrank_keys.stride(0), lowrank_keys.stride(1), out.stride(0), out.stride(1),
        PRECISION=_precision(q.dtype), EVEN_R=_pow2(R, 16) == R,
        F16_ACC=lowrank_keys.dtype == torch.float16,
        BLOCK_B=block_b, BLOCK_G=block_g, BLOCK_D=_pow2(D, 16), BLOCK_R=_pow2(R, 16),
        BLOCK_N=_pow2(block_n, 16), num_warps=num_warps, num_stages=num_stages,
        PROJECTED=project_first, UNROLL=unroll,
    )
    # fmt: on
    return out
