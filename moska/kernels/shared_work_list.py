"""Work list of the grouped shared-chunk attention, built on the device with no host sync.

Items are (group, row tile, split): a group is the selections of one (chunk, KV head)
pair, contiguous in the sorted selections; its query rows are cut into tiles of BLOCK_M
rows, and a long chunk with few tiles is split along the sequence so that the launch still
fills the GPU. The grid of the attention launch is an upper bound W_max on the number of
items computed from host-known sizes; programs past the last item return at once.
"""

import torch
import triton
import triton.language as tl

from .shared_inputs import chunk_table


@triton.jit
def _lower_bound(sel_chunk_ptr, sel_kv_ptr, k, N, Hkv, steps):
    # First selection index whose key chunk * Hkv + kv_head is >= k, for each k [BLOCK].
    lo = tl.zeros_like(k)
    hi = tl.zeros_like(k) + N
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        c = tl.load(sel_chunk_ptr + mid, mask=active, other=0)
        h = tl.load(sel_kv_ptr + mid, mask=active, other=0)
        right = active & (c * Hkv + h < k)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _plan_groups_kernel(
    sel_chunk_ptr,  # [N] int32
    sel_kv_ptr,  # [N] int32
    starts_ptr,  # [C] int32: first pool row of chunk c
    ends_ptr,  # [C] int32: end row of chunk c
    start_ptr,  # [K] int32 out: first selection of group k = chunk * Hkv + kv_head
    nsel_ptr,  # [K] int32 out: selections of group k
    work_ptr,  # [K] int64 out: row tiles x tokens of group k
    N,
    K,
    Hkv,
    steps,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = k < K
    start = _lower_bound(sel_chunk_ptr, sel_kv_ptr, k, N, Hkv, steps)
    n_sel = _lower_bound(sel_chunk_ptr, sel_kv_ptr, k + 1, N, Hkv, steps) - start
    c = k // Hkv
    lens = tl.load(ends_ptr + c, mask=ok, other=0) - tl.load(starts_ptr + c, mask=ok, other=0)
    tiles = (n_sel * G + BLOCK_M - 1) // BLOCK_M
    tl.store(start_ptr + k, start, mask=ok)
    tl.store(nsel_ptr + k, n_sel, mask=ok)
    tl.store(work_ptr + k, tiles.to(tl.int64) * lens, mask=ok)


@triton.jit
def _plan_splits_kernel(
    starts_ptr,  # [C] int32: first pool row of chunk c
    ends_ptr,  # [C] int32: end row of chunk c
    nsel_ptr,  # [K] int32
    total_work_ptr,  # [] int64: sum of the groups' work
    nsplit_ptr,  # [K] int32 out: splits of each tile of group k
    items_ptr,  # [K] int32 out: items of group k (tiles x splits)
    meta_ptr,  # [2] int32 out: meta[1] = split_len
    K,
    Hkv,
    target_programs,
    min_split,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = k < K
    total = tl.load(total_work_ptr)
    split_len = tl.maximum((total + target_programs - 1) // target_programs, min_split)
    split_len = ((split_len + BLOCK_N - 1) // BLOCK_N * BLOCK_N).to(tl.int32)
    c = k // Hkv
    lens = tl.load(ends_ptr + c, mask=ok, other=0) - tl.load(starts_ptr + c, mask=ok, other=0)
    n_sel = tl.load(nsel_ptr + k, mask=ok, other=0)
    n_split = tl.maximum(lens // split_len, 1)
    tl.store(nsplit_ptr + k, n_split, mask=ok)
    tl.store(items_ptr + k, (n_sel * G + BLOCK_M - 1) // BLOCK_M * n_split, mask=ok)
    if tl.program_id(0) == 0:
        tl.store(meta_ptr + 1, split_len)


@triton.jit
def _plan_fused_kernel(
    sel_chunk_ptr,  # [N] int32
    sel_kv_ptr,  # [N] int32
    starts_ptr,  # [C] int32: first pool row of chunk c
    ends_ptr,  # [C] int32: end row of chunk c
    start_ptr,  # [K] int32 out
    nsel_ptr,  # [K] int32 out
    nsplit_ptr,  # [K] int32 out
    items_ptr,  # [K] int32 out
    cum_ptr,  # [K] int32 out: inclusive cumsum of items
    meta_ptr,  # [2] int32 out: (items W, split_len)
    N,
    K,
    Hkv,
    steps,
    target_programs,
    min_split,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # The three planning steps (group bounds, split length, item counts) in one program
    # over all K groups, with the sum and the prefix sum in registers: one launch, not four.
    k = tl.arange(0, BLOCK_K)
    ok = k < K
    start = _lower_bound(sel_chunk_ptr, sel_kv_ptr, k, N, Hkv, steps)
    n_sel = _lower_bound(sel_chunk_ptr, sel_kv_ptr, k + 1, N, Hkv, steps) - start
    n_sel = tl.where(ok, n_sel, 0)
    c = k // Hkv
    lens = tl.load(ends_ptr + c, mask=ok, other=0) - tl.load(starts_ptr + c, mask=ok, other=0)
    tiles = (n_sel * G + BLOCK_M - 1) // BLOCK_M
    total = tl.sum(tiles.to(tl.int64) * lens, 0)
    split_len = tl.maximum((total + target_programs - 1) // target_programs, min_split)
    split_len = ((split_len + BLOCK_N - 1) // BLOCK_N * BLOCK_N).to(tl.int32)
    n_split = tl.maximum(lens // split_len, 1)
    items = tiles * n_split
    cum = tl.cumsum(items, 0)
    tl.store(start_ptr + k, start, mask=ok)
    tl.store(nsel_ptr + k, n_sel, mask=ok)
    tl.store(nsplit_ptr + k, n_split, mask=ok)
    tl.store(items_ptr + k, items, mask=ok)
    tl.store(cum_ptr + k, cum, mask=ok)
    tl.store(meta_ptr + 1, split_len)


@triton.jit
def _plan_items_kernel(
    cum_ptr,  # [K] int32 inclusive cumsum of items
    items_ptr,  # [K] int32
    start_ptr,  # [K] int32
    nsel_ptr,  # [K] int32
    nsplit_ptr,  # [K] int32
    work_ptr,  # [5, W_max] int32 out
    meta_ptr,  # [2] int32 out: meta[0] = number of items W
    K,
    W_max,
    steps,
    BLOCK: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = j < W_max
    lo = tl.zeros_like(j)  # owner group: first k with cum[k] > j
    hi = tl.zeros_like(j) + K
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        right = active & (tl.load(cum_ptr + mid, mask=active, other=0) <= j)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    owner = tl.minimum(lo, K - 1)
    local = j - (tl.load(cum_ptr + owner) - tl.load(items_ptr + owner))
    ns = tl.load(nsplit_ptr + owner)
    tl.store(work_ptr + j, tl.load(start_ptr + owner), mask=ok)
    tl.store(work_ptr + W_max + j, tl.load(nsel_ptr + owner), mask=ok)
    tl.store(work_ptr + 2 * W_max + j, local // ns, mask=ok)
    tl.store(work_ptr + 3 * W_max + j, local % ns, mask=ok)
    tl.store(work_ptr + 4 * W_max + j, ns, mask=ok)
    if tl.program_id(0) == 0:
        tl.store(meta_ptr, tl.load(cum_ptr + K - 1))


def build_work_list(
    sel,  # Selections [N]
    table,  # ChunkTable (starts [C], ends [C] int32) or chunk offsets [C + 1] int32
    num_kv_heads: int,
    group: int,
    block_m: int,
    block_n: int,
    target_programs: int,
    min_split: int,
    max_fused_groups: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Builds the (group, row tile, split) items on the device, with no host sync.

    Returns (work [5, W_max] int32, meta [2] int32 = (items W, split_len), W_max). Rows of
    work: group start selection, group selections, row tile, split, splits of the tile.
    Groups are indexed by key k = chunk * Hkv + kv_head (K = C * Hkv of them, most maybe
    empty); their bounds in the sorted selections come from a binary search. split_len
    spreads the total work (tiles x tokens) over about `target_programs` items, never below
    `min_split` tokens, rounded to BLOCK_N; a group of L tokens gets floor(L / split_len)
    splits (at least 1) of ceil(L / splits) tokens rounded up to BLOCK_N, which the
    attention kernel recomputes from the chunk length and the split count. Flooring keeps W
    at or below the target when the work divides (a ceil overshot it: 64 tiles of a 128K
    chunk on 132 programs became 192 items, 1.45 waves of one-CTA-per-SM programs, instead
    of 128). Since each group's splits are <= L / split_len + 1, W <= target_programs +
    total tiles, and total tiles <= N*G/BLOCK_M + groups: W_max bounds W from host-known
    sizes.
    Two launches when K <= max_fused_groups (one program plans every group, then the items
    are written), else five (three small Triton kernels, a sum and a cumsum).
    """
    table = chunk_table(table)
    n = sel.req.numel()
    dev = sel.req.device
    k_groups = table.starts.numel() * num_kv_heads
    w_max = target_programs + n * group // block_m + min(n, k_groups) + 1
    i32 = {"device": dev, "dtype": torch.int32}
    start, n_sel = torch.empty(k_groups, **i32), torch.empty(k_groups, **i32)
    group_work = torch.empty(k_groups, device=dev, dtype=torch.int64)
    n_split, items = torch.empty(k_groups, **i32), torch.empty(k_groups, **i32)
    work, meta = torch.empty(5, w_max, **i32), torch.empty(2, **i32)
    block = 256  # several programs: the binary searches are chains of dependent loads
    if k_groups <= max_fused_groups:
        cum = torch.empty(k_groups, **i32)
        block_k = max(16, triton.next_power_of_2(k_groups))
        _plan_fused_kernel[(1,)](
            sel.chunk,
            sel.kv_head,
            table.starts,
            table.ends,
            start,
            n_sel,
            n_split,
            items,
            cum,
            meta,
            n,
            k_groups,
            num_kv_heads,
            n.bit_length() + 1,
            target_programs,
            min_split,
            G=group,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=8 if block_k >= 2048 else 4,
        )
        return _write_items(cum, items, start, n_sel, n_split, work, meta, k_groups, w_max, block)
    grid_k = (triton.cdiv(k_groups, block),)
    _plan_groups_kernel[grid_k](
        sel.chunk,
        sel.kv_head,
        table.starts,
        table.ends,
        start,
        n_sel,
        group_work,
        n,
        k_groups,
        num_kv_heads,
        n.bit_length() + 1,
        G=group,
        BLOCK_M=block_m,
        BLOCK=block,
    )
    total_work = group_work.sum()
    _plan_splits_kernel[grid_k](
        table.starts,
        table.ends,
        n_sel,
        total_work,
        n_split,
        items,
        meta,
        k_groups,
        num_kv_heads,
        target_programs,
        min_split,
        G=group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK=block,
    )
    cum = torch.cumsum(items, 0, dtype=torch.int32)
    return _write_items(cum, items, start, n_sel, n_split, work, meta, k_groups, w_max, block)


def _write_items(cum, items, start, n_sel, n_split, work, meta, k_groups, w_max, block):
    _plan_items_kernel[(triton.cdiv(w_max, block),)](
        cum,
        items,
        start,
        n_sel,
        n_split,
        work,
        meta,
        k_groups,
        w_max,
        k_groups.bit_length() + 1,
        BLOCK=block,
    )
    return work, meta, w_max
