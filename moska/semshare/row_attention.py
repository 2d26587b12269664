"""Attention of scattered prompt rows over a request's paged cache, by position.

The blended prefill (`blend.py`) computes only some rows of a prompt past its first layers;
each row attends causally to the request's whole cache up to its own position, reference
KV included. On CUDA the scattered rows go through `moska.kernels.row_attention` (a program
per tile of rows stops at the tile's last position; no [R, S] mask); on the CPU, and for a
whole prompt's first layers (plain causal, flash), through SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moska.kernels.row_attention import row_attention

# SDPA backends of the row attention: not cuDNN, which torch >= 2.11 prefers on sm90 but which
# builds a graph (~0.1 s) for every new shape, and the row count R differs per request (the
# boundary keeps the unmatched rows); the memory-efficient kernel takes the mask, plans nothing
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def warm_row_kernel(
    cache, num_heads: int, sm_scale: float, max_rows: int, cuda_only: bool = True
) -> int:
    """Compile the row attention kernel's variants a blend can pick (CUDA, before any
    request; nothing is written): its key block is 128 when the rows are fewer than half
    the request's positions, else 64 (`moska.kernels.row_attention`), and one row (the
    finished last token). Why: the boundary layer's rest calls it eagerly over the request's
    positions, and on an H200 the first blend that kept more than half of its rows compiled
    the 64 variant inside its time to first token (1.04 s in the session-17 steady run).
    Returns the row counts run (0 off CUDA unless `cuda_only` is False: the tests)."""
    kc = cache.k[0].view(-1, *cache.k.shape[-2:])  # [slots, Hkv, D]
    vc = cache.v[0].view(-1, *cache.v.shape[-2:])
    if (cuda_only and not kc.is_cuda) or kc.shape[-1] < 16 or kc.shape[-1] & (kc.shape[-1] - 1):
        return 0
    s = max(2, min(max_rows, kc.shape[0]))
    slots = torch.arange(s, dtype=torch.int64, device=kc.device)
    # one row; fewer than half; all; and each of the two again at a row count that is no
    # multiple of 16 (Triton specializes an int argument on that; a blend's row count is
    # its prompt's length when the bucket is capped there)
    counts = sorted({1, max(1, s // 4), s // 4 + 1, s - 1, s})
    for r in counts:
        q = torch.zeros(r, num_heads, kc.shape[-1], dtype=kc.dtype, device=kc.device)
        pos = torch.arange(s - r, s, dtype=torch.int32, device=kc.device)
        row_attention(q, kc, vc, slots, pos, sm_scale)
    return len(counts)


def slots_of(table: list[int], block_size: int, start: int, end: int, device) -> torch.Tensor:
    """[end - start] int64 cache slots of token positions [start, end). The host-to-device
    copy is non-blocking (pageable memory is staged at once; a blocking copy would wait
    for the stream's queued work)."""
    pos = torch.arange(start, end)
    blocks = torch.as_tensor(table, dtype=torch.int64)[pos // block_size]
    return (blocks * block_size + pos % block_size).to(device, non_blocking=True)


class RowAttention:
    """attn(slot, q, k, v) for rows at arbitrary positions of one request: writes the rows'
    k, v to their cache slots, then each row attends to cache positions <= its own.
    `causal`: the rows are every position 0..S-1 in order (a whole prompt's first layers),
    so plain causal attention (flash, no [R, S] mask) computes the same.
    `kernel`: use the row attention kernel (True), SDPA (False), or choose (None: the kernel
    for non-causal rows on CUDA, where the masked SDPA took 12 of a blend's ~27 ms of GPU
    time on an H200; SDPA on the CPU, where Triton runs only in its slow interpreter)."""

    def __init__(
        self,
        cache,
        slots: torch.Tensor,
        positions: torch.Tensor,
        sm_scale: float,
        causal: bool = False,
        kernel: bool | None = None,
        ops=None,
    ):
        self.cache = cache
        self.all_slots = slots  # [S] int64: slots of positions 0..S-1
        self.positions = positions  # [R] int64, the rows' positions (< S)
        self.sm_scale = sm_scale
        self.causal = causal
        if causal:
            assert positions.shape == slots.shape, (tuple(positions.shape), tuple(slots.shape))
        self.kernel = kernel
        self.ops = ops  # a KernelOps table: its kv_write (one launch for k and v), or None
        self.last_fresh: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._pos32: torch.Tensor | None = None  # positions as the kernel takes them
        self._row_slots: torch.Tensor | None = None  # slots of the rows, once per row set
        self._write_rows: torch.Tensor | None = None  # [W] rows written (None: all)

    def skip_writes(self, skip: torch.Tensor | None) -> None:
        """Rows (`skip` [R] bool, host) whose KV is never written: they sit in blocks shared
        with the reference (`sharing.py`), which already hold the same KV."""
        if skip is not None and bool(skip.any()):
            rows = (~skip).nonzero().squeeze(1)
            self._write_rows = rows.to(self.all_slots.device, non_blocking=True)
            self._row_slots = None

    def keep(self, rows: torch.Tensor) -> None:
        self.positions = self.positions[rows]
        self.causal = False
        self._pos32 = self._row_slots = self._write_rows = None  # kept rows are never shared

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The rows' fresh k, v [R, Hkv, D] into layer `slot` of the cache."""
        kc = self.cache.k[slot].view(-1, *self.cache.k.shape[-2:])  # [blocks * bs, Hkv, D]
        vc = self.cache.v[slot].view(-1, *self.cache.v.shape[-2:])
        if self._row_slots is None:
            self._row_slots = self.all_slots[self.positions]
            if self._write_rows is not None:
                self._row_slots = self._row_slots[self._write_rows]
        if self._write_rows is not None:
            k, v = k[self._write_rows], v[self._write_rows]
        if self.ops is not None:
            self.ops.kv_write(k, v, kc, vc, self._row_slots)
        else:
            kc[self._row_slots] = k.to(kc.dtype)
            vc[self._row_slots] = v.to(vc.dtype)

    def _use_kernel(self, kc: torch.Tensor) -> bool:
        d = kc.shape[-1]
        if d < 16 or d & (d - 1):  # the kernel's tl.dot needs a power-of-two head_dim >= 16
            return False
        if self.kernel is None:
            return kc.is_cuda and not self.causal
        return self.kernel

    def __call__(self, slot: int, q, k, v) -> torch.Tensor:
        kc = self.cache.k[slot].view(-1, *self.cache.k.shape[-2:])  # [blocks * bs, Hkv, D]
        vc = self.cache.v[slot].view(-1, *self.cache.v.shape[-2:])
        if k is not None:
            self.write(slot, k, v)
            self.last_fresh = (slot, k, v)
        if self._use_kernel(kc):
            if self._pos32 is None:
                self._pos32 = self.positions.to(torch.int32)
            o = row_attention(q.to(kc.dtype), kc, vc, self.all_slots, self._pos32, self.sm_scale)
            return o.to(q.dtype)  # [R, Hq, D]
        # KV heads repeated for GQA: SDPA's memory-efficient kernel takes a mask but not
        # enable_gqa, which would fall back to the math path ([Hq, R, S] scores)
        group = q.shape[1] // kc.shape[1]
        keys = kc[self.all_slots].repeat_interleave(group, 1).transpose(0, 1)[None]  # [1,Hq,S,D]
        values = vc[self.all_slots].repeat_interleave(group, 1).transpose(0, 1)[None]
        s = keys.shape[2]
        mask = None
        if not self.causal:
            mask = torch.arange(s, device=q.device)[None, :] <= self.positions[:, None]  # [R,S]
        with sdpa_kernel(_BACKENDS):
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None].to(keys.dtype),  # [1, Hq, R, D]
                keys,
                values,
                attn_mask=mask,
                is_causal=self.causal,
                scale=self.sm_scale,
            )
        return o[0].transpose(0, 1).to(q.dtype)  # [R, Hq, D]
