"""The key-max pair kernel's work list, built in one launch.

Pairs (request, chunk) come sorted by chunk; a tile is up to BLOCK_B consecutive pairs of
one chunk, tiles in chunk order, and the list has a fixed length T = cdiv(P, BLOCK_B) + C
(an upper bound, so the grid is sized without a host sync) padded with empty tiles
(start = end = P). Built with torch ops this took ~20 small launches per layer (index,
compare, cumsum, scatters), more than the rest of the two-stage router at small B; here a
single program scans the chunks' pair counts (searchsorted gives their bounds) and writes
every tile.
"""

import torch
import triton
import triton.language as tl

from .runtime import triton_runs_on


@triton.jit
def _tiles_kernel(
    first_ptr,  # [C + 1] int32: first pair of each chunk (pairs sorted by chunk), then P
    start_ptr,  # [T] int32 out
    end_ptr,  # [T] int32 out
    chunk_ptr,  # [T] int32 out
    C,
    P,
    T,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # every tile empty first, then the real ones over them (one program: the barrier orders)
    for t0 in range(0, T, BLOCK_C):
        t = t0 + tl.arange(0, BLOCK_C)
        ok = t < T
        tl.store(start_ptr + t, P, mask=ok)
        tl.store(end_ptr + t, P, mask=ok)
        tl.store(chunk_ptr + t, 0, mask=ok)
    tl.debug_barrier()
    carry = tl.sum(tl.zeros((BLOCK_C,), tl.int32), 0)  # tiles before this block (an i32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = c < C
        lo = tl.load(first_ptr + c, mask=ok, other=0)
        hi = tl.load(first_ptr + c + 1, mask=ok, other=0)
        n = tl.where(ok, (hi - lo + BLOCK_B - 1) // BLOCK_B, 0)
        off = carry + tl.cumsum(n, 0) - n  # first tile of each chunk
        for i in range(tl.max(n, 0)):
            has = i < n
            s = lo + i * BLOCK_B
            tl.store(start_ptr + off + i, s, mask=has)
            tl.store(end_ptr + off + i, tl.minimum(s + BLOCK_B, hi), mask=has)
            tl.store(chunk_ptr + off + i, c, mask=has)
        carry += tl.sum(n, 0)


def pair_tiles(
    pair_chunk: torch.Tensor, num_chunks: int, block_b: int, use_triton: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tile_start, tile_end, tile_chunk), each [cdiv(P, block_b) + C] int32, of pairs sorted
    by chunk (``pair_chunk`` [P] int32). ``use_triton`` False: the torch reference."""
    P, C, dev = pair_chunk.numel(), num_chunks, pair_chunk.device
    bounds = torch.arange(C + 1, device=dev, dtype=torch.int32)
    first = torch.searchsorted(pair_chunk, bounds, out_int32=True)
    T = triton.cdiv(P, block_b) + C
    if not use_triton or not triton_runs_on(dev, _tiles_kernel):
        return pair_tiles_ref(pair_chunk, first, block_b, T)
    start, end, chunk = (torch.empty(T, dtype=torch.int32, device=dev) for _ in range(3))
    block_c = min(1024, triton.next_power_of_2(max(C, 16)))
    _tiles_kernel[(1,)](first, start, end, chunk, C, P, T, BLOCK_B=block_b, BLOCK_C=block_c)
    return start, end, chunk


def pair_tiles_ref(
    pair_chunk: torch.Tensor, first: torch.Tensor, block_b: int, T: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same list with torch ops: a tile starts at every block_b-th pair of a chunk."""
    P, dev = pair_chunk.numel(), pair_chunk.device
    pos = torch.arange(P, device=dev)
    is_start = (pos - first[pair_chunk.long()]) % block_b == 0
    tile_id = torch.where(is_start, torch.cumsum(is_start, 0) - 1, T)
    tile_start = torch.full((T + 1,), P, dtype=torch.int32, device=dev)
    tile_start.scatter_(0, tile_id, pos.to(torch.int32))
    tile_chunk = torch.zeros(T + 1, dtype=torch.int32, device=dev)
    tile_chunk.scatter_(0, tile_id, pair_chunk.to(torch.int32))
    chunk_end = first[1:][tile_chunk.long()]
    tile_end = torch.minimum(tile_start + block_b, chunk_end).to(torch.int32)
    tile_end = torch.where(tile_start < P, tile_end, tile_start)
    return tile_start[:T], tile_end[:T], tile_chunk[:T]
