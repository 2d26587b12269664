"""Copy scattered rows (whole KV pages) from one tensor into slots of another, where the
source may be pinned host memory read by the GPU over the bus (zero copy): FlexiCache's
fetches of promoted pages (`moska/flexicache/store.py`).

Gathering the pages on the host first (index_select into pinned staging, then one copy up)
costs a host thread and host memory bandwidth while the GPU waits for the copy. Under
unified addressing, memory from cudaHostAlloc (torch's pinned memory) has one address on
the host and the device, so a kernel can read the pages in place: one program per (row,
tile), indices on the device, nothing read back.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(src_ptr, src_idx_ptr, dst_ptr, dst_idx_ptr, ROW: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    i = tl.program_id(0)
    t = tl.program_id(1)
    s = tl.load(src_idx_ptr + i).to(tl.int64)
    d = tl.load(dst_idx_ptr + i).to(tl.int64)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.where(d >= 0, ROW, 0)  # a negative index: an unused entry
    x = tl.load(src_ptr + s * ROW + offs, mask=mask)
    tl.store(dst_ptr + d * ROW + offs, x, mask=mask)


def gather_rows(
    src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor
) -> None:
    """dst[dst_idx[i]] = src[src_idx[i]] for rows (the first dimension) of equal shape and
    dtype; `src` and `dst` contiguous, the indices int64 on the kernel's device; an entry
    with dst_idx[i] < 0 is skipped (lists padded to a length the host knows, so that it
    need not read how many are used). `src` may be pinned host memory (read in place by
    the GPU)."""
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(
            f"rows differ: src {tuple(src.shape)} {src.dtype}, dst {tuple(dst.shape)} {dst.dtype}"
        )
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("gather_rows needs contiguous src and dst")
    if src_idx.shape != dst_idx.shape or src_idx.dim() != 1:
        raise ValueError(f"indices must be 1-D of one length: {src_idx.shape}, {dst_idx.shape}")
    n, row = src_idx.numel(), src[0].numel()
    if n == 0:
        return
    block = min(1024, triton.next_power_of_2(row))
    grid = (n, triton.cdiv(row, block))
    _gather_rows_kernel[grid](src, src_idx, dst, dst_idx, ROW=row, BLOCK=block)


def gather_rows_ref(
    src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor
) -> None:
    """The reference: an indexed read and an indexed write (entries with dst_idx < 0 skipped)."""
    used = dst_idx >= 0
    dst[dst_idx[used].to(dst.device)] = src[src_idx[used].to(src.device)].to(dst.device)
