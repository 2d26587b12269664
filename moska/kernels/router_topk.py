"""Top-k chunks of each routing row in one Triton launch (the router's last step before
``from_topk``).

``torch.topk`` on the default router's [B, Hkv, C] score table is a radix select per row
(two launches, 0.15 ms of the 4.2 ms routing call at B = 1,024, 8B dims, 256 chunks in
session 16). A row here is at most a few thousand chunks, so a program loads whole rows
into registers and takes the maximum k times: one launch, the table read once.

Order and ties (what ``topk_rows_ref`` states and the tests check): values descending;
among equal values the lower chunk index first; NaN counts as larger than every number
(as in ``torch.topk``). The chosen set equals ``torch.topk``'s wherever the k-th and
(k+1)-th values differ; the CUDA device test also counts agreement on the device's own
score tables.
"""

import torch
import triton
import triton.language as tl

from .runtime import triton_runs_on

MAX_COLS = 4096  # wider rows fall back to torch.topk (registers)


@triton.jit
def _topk_rows_kernel(
    x_ptr,  # [R, C] fp32 contiguous
    out_ptr,  # [R, K] int32
    R,
    C,
    K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = cols < C
    ptrs = x_ptr + rows[:, None].to(tl.int64) * C + cols[None, :]
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))
    # NaN (x != x) above every number, as in torch.topk
    x = tl.where(x != x, float("inf"), x)  # noqa: PLR0124
    live = col_ok[None, :] & (rows >= 0)[:, None]  # [BLOCK_R, BLOCK_C] not yet taken
    for j in tl.static_range(K):
        cand = tl.where(live, x, float("-inf"))
        best = tl.max(cand, axis=1)  # [BLOCK_R]
        hit = live & (cand == best[:, None])
        idx = tl.min(tl.where(hit, cols[None, :], BLOCK_C), axis=1)  # lowest index on ties
        tl.store(out_ptr + rows.to(tl.int64) * K + j, idx, mask=row_ok)
        live = live & (cols[None, :] != idx[:, None])


def topk_rows(x: torch.Tensor, k: int, use_triton: bool = True) -> torch.Tensor:
    """Indices [..., k] (int64) of the k largest values of each row of ``x`` [..., C] fp32,
    values descending, ties to the lower index (``topk_rows_ref``). Rows wider than
    MAX_COLS, k > 64, or a device Triton cannot run on: ``topk_rows_ref``."""
    C = x.shape[-1]
    if not 0 <= k <= C:
        raise ValueError(f"topk_rows: need 0 <= k <= C = {C}, got k = {k}")
    if (
        not use_triton
        or C > MAX_COLS
        or k > 64
        or x.dtype != torch.float32
        or not triton_runs_on(x.device, _topk_rows_kernel)
    ):
        return topk_rows_ref(x, k)
    lead = x.shape[:-1]
    rows = x.reshape(-1, C).contiguous()
    R = rows.shape[0]
    out = torch.empty(R, k, dtype=torch.int32, device=x.device)
    if R == 0 or k == 0:
        return out.long().view(*lead, k)
    block_c = max(16, triton.next_power_of_2(C))
    block_r = max(1, min(triton.next_power_of_2(R), 2048 // block_c, 16))
    warps = 4 if block_c * block_r >= 1024 else 1
    _topk_rows_kernel[(triton.cdiv(R, block_r),)](
        rows, out, R, C, K=k, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps
    )
    return out.long().view(*lead, k)


def topk_rows_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """Plain-PyTorch reference: a stable descending sort (ties keep the lower index first;
    NaN above every number), its first k indices."""
    key = torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x)
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]
