"""Chunk scoring kernels of the router, each with a plain-PyTorch reference.

Two kernels:

- ``_summary_scores_kernel`` scores every (request, KV head, chunk) against a per-chunk
  summary: the mean key (one dot product) or the Quest min/max bound. The bound
  ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` equals ``relu(q) . kmax + min(q, 0) . kmin``
  because ``kmin <= kmax``, so it is two dot products as well.
- ``_keymax_scores_kernel`` runs over a work list of tiles, each tile = one chunk and up to
  BLOCK_B (request, chunk) pairs of that chunk, the way a fused MoE kernel runs over
  (expert, token tile). It projects the tile's query rows onto the head's basis, streams the
  chunk's low-rank keys in blocks of BLOCK_N and keeps an elementwise running max of the
  logits over a [rows, BLOCK_N] tile, so no [rows, S_total] matrix ever exists. With fp16
  low-rank keys (what ``build_routing_index`` makes for half-precision pools) the logits
  are accumulated in fp16 and the running max is a packed fp16x2 max: a K = r product gives
  only 2r FLOPs per logit, so the one max per logit is as much work for the SM as the
  product itself, and packing halves it.

The query-row load and the key loop are in ``router_rows.py`` (router_dense.py uses them too).
Query rows of a tile are (request, group head) pairs laid out as BLOCK_B x BLOCK_G (the GQA
group G padded to a power of two); the max over the group is a reshape + max. All tl.dot
dimensions are padded to >= 16.
"""

import torch
import triton
import triton.language as tl

from .router_ref import bound_scores_ref, keymax_scores_ref, mean_scores_ref
from .router_rows import _keymax_rows, _load_q_rows
from .router_tiles import pair_tiles
from .runtime import triton_runs_on


@triton.jit
def _group_max(s, G, BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    # s [BLOCK_B * BLOCK_G, BLOCK_C] -> max over the G real heads of each group [BLOCK_B, BLOCK_C]
    s = tl.reshape(s, (BLOCK_B, BLOCK_G, BLOCK_C))
    g_ok = (tl.arange(0, BLOCK_G) < G)[None, :, None]
    return tl.max(tl.where(g_ok, s, float("-inf")), axis=1)


# fmt: off
@triton.jit
def _summary_scores_kernel(
    q_ptr,  # [B, Hq, D]
    a_ptr,  # [C, Hkv, D] mean keys, or key_max for the bound
    b_ptr,  # [C, Hkv, D] key_min (bound only)
    out_ptr,  # [B, Hkv, C] fp32
    B, C, G, D,
    stride_qb, stride_qh, stride_ac, stride_ah, stride_ob, stride_oh,
    BOUND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # fmt: on
    pid_c = tl.program_id(0)
    h = tl.program_id(1)
    pid_b = tl.program_id(2)
    req = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    req_ok = req < B
    q = _load_q_rows(q_ptr, stride_qb, stride_qh, req, req_ok, h, G, D, BLOCK_B, BLOCK_G, BLOCK_D)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    # summaries loaded transposed: [BLOCK_D, BLOCK_C]
    s_off = offs_c[None, :] * stride_ac + h * stride_ah + offs_d[:, None]
    s_mask = (offs_c < C)[None, :] & (offs_d < D)[:, None]
    a = tl.load(a_ptr + s_off, mask=s_mask, other=0.0)
    if BOUND:
        b = tl.load(b_ptr + s_off, mask=s_mask, other=0.0)
        zero = tl.zeros_like(q)
        # Triton 3.6 promotes bf16 max/min to fp32: cast back so both dot operands match.
        s = tl.dot(tl.maximum(q, zero).to(a.dtype), a, input_precision=PRECISION)
        s += tl.dot(tl.minimum(q, zero).to(b.dtype), b, input_precision=PRECISION)
    else:
        s = tl.dot(q, a, input_precision=PRECISION)
    best = _group_max(s, G, BLOCK_B, BLOCK_G, BLOCK_C)  # [BLOCK_B, BLOCK_C]
    o_ptrs = out_ptr + req[:, None] * stride_ob + h * stride_oh + offs_c[None, :]
    tl.store(o_ptrs, best, mask=req_ok[:, None] & (offs_c < C)[None, :])


# fmt: off
@triton.jit
def _keymax_scores_kernel(
    q_ptr,  # [B, Hq, D]
    basis_ptr,  # [Hkv, D, R]
    lk_ptr,  # [S_total, Hkv, R] low-rank keys
    offsets_ptr,  # [C + 1] int32
    pair_req_ptr,  # [P] int32, pairs sorted by chunk
    tile_start_ptr,  # [T] int32 first pair of each tile (P for an empty tile)
    tile_end_ptr,  # [T] int32 one past the last pair of each tile
    tile_chunk_ptr,  # [T] int32 (PER_HEAD: chunk * Hkv + head)
    out_ptr,  # [P, Hkv] fp32 ([P] when PER_HEAD), or [B, Hkv, C] (the strides say which)
    T, Hkv, G, D, R,
    stride_qb, stride_qh, stride_bh, stride_bd, stride_ks, stride_kh,
    stride_op, stride_or, stride_oh, stride_oc,
    PRECISION: tl.constexpr, EVEN_R: tl.constexpr, F16_ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PROJECTED: tl.constexpr,
    PER_HEAD: tl.constexpr = False,
):
    # fmt: on
    # Items (tile t, head h) in launch order t fastest, so programs running together read
    # the same chunk's keys (L2 reuse). A grid smaller than T * Hkv loops over the items, so
    # the kernel can be given a few programs per SM and leave room beside it for a concurrent
    # memory-bound kernel. A score lands at out + pair * stride_op + req * stride_or +
    # h * stride_oh + chunk * stride_oc: [P, Hkv] rows per pair, or straight into the
    # router's [B, Hkv, C] score table (no scatter afterwards). PER_HEAD: pairs are
    # (request, KV head, chunk) triples sorted by (chunk, head), each scored for its head
    # only (a shortlist per KV head); a tile is one (chunk, head) and the items are tiles.
    n_items = T if PER_HEAD else T * Hkv
    for w in range(tl.program_id(0), n_items, tl.num_programs(0)):
        t = w % T
        start = tl.load(tile_start_ptr + t)
        end = tl.load(tile_end_ptr + t)
        key = tl.load(tile_chunk_ptr + t)
        if PER_HEAD:
            chunk = key // Hkv
            h = key % Hkv
        else:
            chunk = key
            h = w // T
        pair = start + tl.arange(0, BLOCK_B)
        pair_ok = pair < end
        req = tl.load(pair_req_ptr + pair, mask=pair_ok, other=0)
        lo = tl.load(offsets_ptr + chunk)
        hi = tl.load(offsets_ptr + chunk + 1)
        hi = tl.where(end > start, hi, lo)  # empty tile: skip the key loop
        # fmt: off
        best = _keymax_rows(
            q_ptr, basis_ptr, lk_ptr, req, pair_ok, h, lo, hi, G, D, R,
            stride_qb, stride_qh, stride_bh, stride_bd, stride_ks, stride_kh,
            PRECISION, EVEN_R, F16_ACC, BLOCK_B, BLOCK_G, BLOCK_D, BLOCK_R, BLOCK_N, PROJECTED,
        )
        # fmt: on
        o_ptrs = out_ptr + pair.to(tl.int64) * stride_op + req.to(tl.int64) * stride_or
        tl.store(o_ptrs + h * stride_oh + chunk * stride_oc, best, mask=pair_ok)


def _pow2(x: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(x))


def _precision(dtype: torch.dtype) -> str:
    # fp32 pools are for exactness tests: keep them IEEE instead of TF32 on the tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(q: torch.Tensor, table: torch.Tensor, Hkv: int, D: int) -> tuple[int, int]:
    """Validate q [B, Hq, D] against an index table with Hkv KV heads; returns (B, Hq)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if q.dtype != table.dtype or q.device != table.device:
        raise ValueError(
            f"q ({q.dtype}, {q.device}) must match the routing index "
            f"({table.dtype}, {table.device}); cast q first"
        )
    B, Hq, Dq = q.shape
    if Hq % Hkv != 0 or Dq != D:
        raise ValueError(f"q [B, Hq={Hq}, D={Dq}] does not fit an index with Hkv={Hkv}, D={D}")
    assert q.stride(2) == 1 and table.stride(-1) == 1
    return B, Hq


def summary_scores(
    q: torch.Tensor,
    summary: torch.Tensor,
    key_min: torch.Tensor | None = None,
    block_b: int = 16,
    block_c: int = 64,
    use_triton: bool = True,
) -> torch.Tensor:
    """Mean scores (key_min None: ``summary`` = mean keys) or Quest bound scores (``summary``
    = key_max). q [B, Hq, D], summary/key_min [C, Hkv, D] -> [B, Hkv, C] fp32.
    ``use_triton`` False: the PyTorch reference even where the kernel could run."""
    q = q.contiguous()
    C, Hkv, D = summary.shape
    B, Hq = _check(q, summary, Hkv, D)
    G = Hq // Hkv
    out = torch.empty(B, Hkv, C, dtype=torch.float32, device=q.device)
    if B == 0 or C == 0:
        return out
    if not use_triton or not triton_runs_on(q.device, _summary_scores_kernel):
        if key_min is None:
            return mean_scores_ref(q, summary)
        return bound_scores_ref(q, key_min, summary)
    summary = summary.contiguous()
    bound = key_min is not None
    key_min = key_min.contiguous() if key_min is not None else summary
    assert key_min.shape == summary.shape
    block_g = _pow2(G)
    block_b = max(min(_pow2(block_b), _pow2(B)), _pow2(16 // block_g))
    block_c = max(min(_pow2(block_c), _pow2(C)), 16)
    grid = (triton.cdiv(C, block_c), Hkv, triton.cdiv(B, block_b))
    # fmt: off
    _summary_scores_kernel[grid](
        q, summary, key_min, out, B, C, G, D,
        q.stride(0), q.stride(1), summary.stride(0), summary.stride(1),
        out.stride(0), out.stride(1),
        BOUND=bound, PRECISION=_precision(q.dtype),
        BLOCK_B=block_b, BLOCK_G=block_g, BLOCK_C=block_c, BLOCK_D=_pow2(D, 16),
    )
    # fmt: on
    return out


def keymax_pair_scores(
    q: torch.Tensor,
    basis: torch.Tensor,
    lowrank_keys: torch.Tensor,
    chunk_offsets: torch.Tensor,
    pair_req: torch.Tensor,
    pair_chunk: torch.Tensor,
    block_b: int = 16,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
    max_programs: int | None = None,
    maxnreg: int | None = None,
    use_triton: bool = True,
    out: torch.Tensor | None = None,
    project_first: bool = False,
    pair_head: torch.Tensor | None = None,
) -> torch.Tensor:
    """Key-max scores of (request, chunk) pairs, one grouped launch for all of them.

    ``pair_head`` [P] int32: the pairs are (request, KV head, chunk) triples sorted by
    (chunk, head) (``Selections`` order) and each is scored for its own head only: [P]
    scores, or ``out[req, head, chunk]`` (a shortlist per KV head).

    ``project_first``: the queries are projected onto the bases once before the launch
    (router_dense.project_queries) instead of in every tile.

    ``out`` [B, Hkv, C] fp32 (e.g. filled with -inf): each pair's scores are written to
    ``out[req, :, chunk]`` by the kernel itself and ``out`` is returned (the two-stage
    router's score table without a scatter launch); None: a new [P, Hkv] tensor.

    ``max_programs`` caps the grid (the programs then loop over the tiles), e.g. to one or
    two programs per SM when the kernel runs beside a memory-bound kernel on another stream.
    ``maxnreg`` caps the registers per thread (CUDA), so that its programs fit on an SM
    beside that kernel's.

    q [B, Hq, D]; basis [Hkv, D, R]; lowrank_keys [S_total, Hkv, R]; chunk_offsets [C+1]
    int32; pair_req, pair_chunk [P] int32 sorted by chunk -> [P, Hkv] fp32. Low-rank keys
    may be fp16 whatever q's dtype (then logits are fp16, saturating at +-65504) or q's dtype.
    """
    q, basis = q.contiguous(), basis.contiguous()
    Hkv, D, R = basis.shape
    _, Hq = _check(q, basis, Hkv, D)
    G = Hq // Hkv
    assert lowrank_keys.dim() == 3 and lowrank_keys.shape[1:] == (Hkv, R)
    assert lowrank_keys.stride(2) == 1 and basis.stride(2) == 1
    if lowrank_keys.dtype not in (torch.float16, q.dtype):
        raise ValueError(f"lowrank_keys must be fp16 or {q.dtype}, got {lowrank_keys.dtype}")
    assert pair_req.shape == pair_chunk.shape and pair_req.dtype == torch.int32
    P = pair_req.numel()
    C = chunk_offsets.numel() - 1
    per_head = pair_head is not None
    table = out
    if table is not None:
        want = (q.shape[0], Hkv, C)
        if tuple(table.shape) != want or table.dtype != torch.float32:
            raise ValueError(f"out must be {want} float32, got {tuple(table.shape)} {table.dtype}")
    rows_shape = (P,) if per_head else (P, Hkv)
    out = torch.empty(rows_shape, dtype=torch.float32, device=q.device) if table is None else table
    if P == 0:
        return out
    if not use_triton or not triton_runs_on(q.device, _keymax_scores_kernel):
        full = keymax_scores_ref(q, basis, lowrank_keys, chunk_offsets)  # [B, Hkv, C]
        heads = pair_head.long() if pair_head is not None else slice(None)
        scores = full[pair_req.long(), heads, pair_chunk.long()]
        if table is None:
            return scores
        table[pair_req.long(), heads, pair_chunk.long()] = scores
        return table
    # a score's place: [P, Hkv] by pair ([P] per head), or the [B, Hkv, C] table by
    # (req, head, chunk)
    if table is not None:
        strides = (0, *table.stride())
    else:
        strides = (1, 0, 0, 0) if per_head else (Hkv, 0, 1, 0)
    block_g = _pow2(G)
    block_b = max(min(_pow2(block_b), _pow2(P)), _pow2(16 // block_g))
    # Work list (router_tiles.py): up to BLOCK_B pairs of one chunk (one (chunk, head) per
    # head) per tile, a fixed cdiv(P, BLOCK_B) + C (* Hkv) tiles (no host sync), the spare
    # ones empty; one launch.
    if pair_head is not None:
        keys = pair_chunk * Hkv + pair_head
        tile_start, tile_end, tile_chunk = pair_tiles(keys, C * Hkv, block_b)
    else:
        tile_start, tile_end, tile_chunk = pair_tiles(pair_chunk, C, block_b)
    T = tile_start.numel()
    if project_first:
        from .router_dense import project_queries

        q = project_queries(q, basis, lowrank_keys.dtype)
    # fmt: off
    items = T if per_head else T * Hkv
    grid = (items if max_programs is None else max(1, min(items, max_programs)),)
    _keymax_scores_kernel[grid](
        q, basis, lowrank_keys, chunk_offsets, pair_req, tile_start, tile_end, tile_chunk, out,
        T, Hkv, G, D, R,
        q.stride(0), q.stride(1), basis.stride(0), basis.stride(1),
        lowrank_keys.stride(0), lowrank_keys.stride(1), *strides,
        PRECISION=_precision(q.dtype), EVEN_R=_pow2(R, 16) == R,
        F16_ACC=lowrank_keys.dtype == torch.float16,
        BLOCK_B=block_b, BLOCK_G=block_g, BLOCK_D=_pow2(D, 16), BLOCK_R=_pow2(R, 16),
        BLOCK_N=_pow2(block_n, 16), num_warps=num_warps, num_stages=num_stages,
        PROJECTED=project_first, PER_HEAD=per_head,
        **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
    # fmt: on
    return out
