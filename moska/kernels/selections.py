"""Routing selections: which (request, KV head, chunk) triples attend to shared chunks,
and how to build them from a top-k without sorting.

``from_topk`` turns each request's chosen chunks into Selections sorted by
(chunk, kv_head, req) with a counting sort: mark the chosen (chunk, head, request) cells
of a [C, Hr, B] grid, take its inclusive prefix sum, and let each chosen cell compute its
own output position from three prefix-sum reads. Five small launches (topk excluded),
no host sync, deterministic; a radix sort of the keys costs several times that per layer.
It also emits ``row_order``, the selections grouped by (req, kv_head), so the LSE merge
that follows needs no sort of its own.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .runtime import triton_runs_on


class Selections(NamedTuple):
    """Selected (request, KV head, chunk) triples, int32 [N] tensors on one device.

    Sorted by (chunk, kv_head, req) and unique, so all selections of one chunk are
    contiguous and can be batched into one grouped attention tile. Optionally
    ``row_order`` [N] int32 lists the selection indices grouped by (req, kv_head) and
    ``row_offsets`` [B * Hkv + 1] int32 bounds each (req, kv_head) segment of it.
    """

    req: torch.Tensor  # [N] int32
    kv_head: torch.Tensor  # [N] int32
    chunk: torch.Tensor  # [N] int32
    row_order: torch.Tensor | None = None
    row_offsets: torch.Tensor | None = None


@triton.jit
def _mark_kernel(idx_ptr, mask_ptr, n, B, Hr, K: tl.constexpr, BLOCK: tl.constexpr):
    # idx [B, Hr, K] chosen chunks; mask [C, Hr, B] int32 (zeroed): mask[c, hr, b] = 1
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    c = tl.load(idx_ptr + i, mask=ok, other=0).to(tl.int64)
    b = i // (Hr * K)
    hr = (i // K) % Hr
    tl.store(mask_ptr + (c * Hr + hr) * B + b, 1, mask=ok)


@triton.jit
def _emit_kernel(
    idx_ptr,  # [B, Hr, K] chosen chunks
    cum_ptr,  # [C * Hr * B] int32 inclusive prefix sum of the mark grid
    req_ptr,  # [N] int32 out, N = B * Hkv * K
    kv_ptr,
    chunk_ptr,
    order_ptr,  # [N] int32 out: row_order
    n,
    B,
    Hr,
    E,  # Hkv // Hr: KV heads that share one routing row
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    c = tl.load(idx_ptr + i, mask=ok, other=0).to(tl.int64)
    b = i // (Hr * K)
    hr = (i // K) % Hr
    j = i % K
    r = c * Hr + hr  # routing row (chunk, routed head) of the grid
    first = tl.load(cum_ptr + r * B - 1, mask=ok & (r > 0), other=0)  # chosen cells before r
    n_r = tl.load(cum_ptr + r * B + B - 1, mask=ok, other=0) - first  # requests of row r
    rank = tl.load(cum_ptr + r * B + b, mask=ok, other=1) - 1 - first  # b's place in row r
    for e in range(E):
        pos = first * E + e * n_r + rank
        h = hr * E + e
        tl.store(req_ptr + pos, b.to(tl.int32), mask=ok)
        tl.store(kv_ptr + pos, h.to(tl.int32), mask=ok)
        tl.store(chunk_ptr + pos, c.to(tl.int32), mask=ok)
        tl.store(order_ptr + (b * Hr * E + h) * K + j, pos.to(tl.int32), mask=ok)


def from_topk(
    chunk_idx: torch.Tensor, num_kv_heads: int, num_chunks: int, use_triton: bool = True
) -> Selections:
    """Selections from each request's chosen chunks, sorted by (chunk, kv_head, req).

    ``chunk_idx`` [B, Hr, K] integer, Hr = 1 (every KV head of a request reads the same
    chunks) or Hr = num_kv_heads (routing per KV head); the K chunks of a row must be
    distinct and in [0, num_chunks). Returns Selections with ``row_order``/``row_offsets``.
    ``use_triton`` False: the PyTorch reference even where the kernels could run.
    """
    if chunk_idx.dim() != 3:
        raise ValueError(f"chunk_idx must be [B, Hr, K], got shape {tuple(chunk_idx.shape)}")
    B, Hr, K = chunk_idx.shape
    if Hr not in (1, num_kv_heads):
        raise ValueError(f"chunk_idx has Hr={Hr} routing rows; need 1 or Hkv={num_kv_heads}")
    dev = chunk_idx.device
    N = B * num_kv_heads * K
    offsets = torch.arange(0, N + 1, K, dtype=torch.int32, device=dev)
    if not use_triton or not triton_runs_on(dev, _emit_kernel):
        sel = from_topk_ref(chunk_idx, num_kv_heads)
        return sel._replace(row_offsets=offsets)
    req, kv, chunk, order = (torch.empty(N, device=dev, dtype=torch.int32) for _ in range(4))
    if N == 0:
        return Selections(req, kv, chunk, order, offsets)
    idx = chunk_idx.contiguous()
    mask = torch.zeros(num_chunks * Hr * B, device=dev, dtype=torch.int32)
    n = idx.numel()
    block = (
        128 if dev.type == "cuda" else max(16, triton.next_power_of_2(n))
    )  # many small programs: latency-bound scatters
    grid = (triton.cdiv(n, block),)
    _mark_kernel[grid](idx, mask, n, B, Hr, K=K, BLOCK=block)
    cum = torch.cumsum(mask, 0, dtype=torch.int32)
    _emit_kernel[grid](
        idx, cum, req, kv, chunk, order, n, B, Hr, num_kv_heads // Hr, K=K, BLOCK=block
    )
    return Selections(req, kv, chunk, order, offsets)


def from_topk_ref(chunk_idx: torch.Tensor, num_kv_heads: int) -> Selections:
    """Reference of ``from_topk`` by sorting keys; ``row_order`` keeps each row's top-k order."""
    B, Hr, _K = chunk_idx.shape
    dev = chunk_idx.device
    chunk = chunk_idx.long().repeat_interleave(num_kv_heads // Hr, dim=1)  # [B, Hkv, K]
    req = torch.arange(B, device=dev)[:, None, None]
    head = torch.arange(num_kv_heads, device=dev)[None, :, None]
    key = ((chunk * num_kv_heads + head) * B + req).flatten()  # row-major: (req, head, j)
    key_sorted, perm = torch.sort(key)
    order = torch.empty_like(perm)
    order[perm] = torch.arange(perm.numel(), device=dev)
    return Selections(
        req=(key_sorted % B).to(torch.int32),
        kv_head=((key_sorted // B) % num_kv_heads).to(torch.int32),
        chunk=(key_sorted // (B * num_kv_heads)).to(torch.int32),
        row_order=order.to(torch.int32),
    )
