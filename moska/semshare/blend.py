"""The blended prefill: a prompt range computed with reference KV standing in for most of it.

For prompt tokens [start, end) of one request whose blocks are allocated:
1. every matched token's KV, at every layer, is the reference token's, re-rotated to its
   new position (`rope_shift.rotate_by`) and written into the request's paged cache;
2. the first `recompute_layers` layers run over every token of the range, overwriting that
   KV with fresh KV (as the layers are cheap compared with the rest, and the first layers'
   KV deviates most: SemShareKV, CacheBlend);
3. at the boundary the rows kept are the unmatched tokens plus the `recompute_fraction` of
   matched tokens whose fresh KV deviates most from the reference's at the last fresh
   layer; the remaining layers run over those rows only and overwrite their KV.
Queries attend causally over the request's whole cache [0, end) by position (`RowAttention`),
so a row sees reference KV where its neighbours were not recomputed. On CUDA the scattered
rows go through `moska.kernels.row_attention` (a program per tile of rows stops at the
tile's last position; no [R, S] mask); on the CPU, and for a whole prompt's first layers
(plain causal, flash), through SDPA.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moska.kernels.row_attention import row_attention
from moska.semshare.rope_shift import rotate_by
from moska.semshare.store import Reference

# SDPA backends of the row attention: not cuDNN, which torch >= 2.11 prefers on sm90 but which
# builds a graph (~0.1 s) for every new shape, and the row count R differs per request (the
# boundary keeps the unmatched rows); the memory-efficient kernel takes the mask, plans nothing
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class BlendResult(NamedTuple):
    num_reused: int  # matched tokens whose KV past the first layers came from the reference
    num_recomputed: int  # tokens computed through every layer


def slots_of(table: list[int], block_size: int, start: int, end: int, device) -> torch.Tensor:
    """[end - start] int64 cache slots of token positions [start, end)."""
    pos = torch.arange(start, end)
    blocks = torch.as_tensor(table, dtype=torch.int64)[pos // block_size]
    return (blocks * block_size + pos % block_size).to(device)


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
    ):
        self.cache = cache
        self.all_slots = slots  # [S] int64: slots of positions 0..S-1
        self.positions = positions  # [R] int64, the rows' positions (< S)
        self.sm_scale = sm_scale
        self.causal = causal
        if causal:
            assert positions.shape == slots.shape, (tuple(positions.shape), tuple(slots.shape))
        self.kernel = kernel
        self.last_fresh: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._pos32: torch.Tensor | None = None  # positions as the kernel takes them

    def keep(self, rows: torch.Tensor) -> None:
        self.positions = self.positions[rows]
        self.causal = False
        self._pos32 = None

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
            row_slots = self.all_slots[self.positions]
            kc[row_slots] = k.to(kc.dtype)
            vc[row_slots] = v.to(vc.dtype)
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


def _rerotated(ref: Reference, layers, ref_pos: torch.Tensor, new_pos: torch.Tensor, inv_freq):
    """Reference k, v of `layers` at `ref_pos`, keys moved to `new_pos`."""
    idx = ref_pos.to(ref.k.device)
    k = ref.k[layers][:, idx] if isinstance(layers, slice) else ref.k[layers, idx]
    v = ref.v[layers][:, idx] if isinstance(layers, slice) else ref.v[layers, idx]
    return rotate_by(k, (new_pos - ref_pos).to(k.device), inv_freq), v


def _select(att: RowAttention, ref, ref_pos, new_pos, matched, fraction, inv_freq):
    """Rows kept past the boundary: unmatched + the most deviating `fraction` of matched."""
    n = matched.shape[0]
    m_idx = matched.nonzero().squeeze(1)
    if fraction >= 1.0 or att.last_fresh is None:
        return torch.arange(n, device=matched.device)
    n_keep = math.ceil(fraction * m_idx.numel())
    keep = (~matched).clone()
    if n_keep > 0:
        slot, k, v = att.last_fresh
        k_ref, v_ref = _rerotated(ref, slot, ref_pos[m_idx], new_pos[m_idx], inv_freq)
        kf, vf = k[m_idx].float(), v[m_idx].float()
        dev = (kf - k_ref.float()).flatten(1).norm(dim=1) / kf.flatten(1).norm(dim=1).clamp_min(
            1e-6
        ) + (vf - v_ref.float()).flatten(1).norm(dim=1) / vf.flatten(1).norm(dim=1).clamp_min(1e-6)
        keep[m_idx[dev.topk(n_keep).indices]] = True
    return keep.nonzero().squeeze(1)


@torch.inference_mode()
def blend_prefill(
    model,
    cache,  # PagedKVCache
    table: list[int],  # the request's blocks, covering [0, end)
    token_ids: torch.Tensor,  # [end - start] int64, the prompt's tokens [start, end)
    start: int,
    ref: Reference,
    ref_pos: torch.Tensor,  # [end - start] int64, matched reference position or -1
    recompute_fraction: float,
    recompute_layers: int,
    *,
    row_kernel: bool | None = None,
) -> BlendResult:
    """Compute the KV of prompt positions [start, end) into `cache` (positions before `start`
    must be in it already), reusing `ref` where matched. See the module docstring.
    `row_kernel`: `RowAttention`'s `kernel` (None: the kernel on CUDA)."""
    device = cache.k.device
    n = token_ids.shape[0]
    end = start + n
    slots = slots_of(table, cache.block_size, 0, end, device)  # [end]
    new_pos = torch.arange(start, end, device=device)  # [n]
    ref_pos = ref_pos.to(device)
    matched = ref_pos >= 0
    inv_freq = model.rotary.inv_freq
    m_idx = matched.nonzero().squeeze(1)
    if m_idx.numel() and recompute_layers < len(model.layers):
        k_ref, v_ref = _rerotated(ref, slice(None), ref_pos[m_idx], new_pos[m_idx], inv_freq)
        num_slots = cache.k.shape[0]
        flat = (num_slots, -1, *cache.k.shape[-2:])
        cache.k.view(flat)[:, slots[start:][m_idx]] = k_ref.to(cache.k.dtype)
        cache.v.view(flat)[:, slots[start:][m_idx]] = v_ref.to(cache.v.dtype)
    x = model.embed_tokens(token_ids.to(device))  # [n, H]
    ops = model.kernels  # the engine's kernel table
    cos, sin = model.rotary.cos_sin_half(new_pos)  # [n, D/2] fp32 each
    att = RowAttention(
        cache, slots, new_pos, model.config.sm_scale, causal=start == 0, kernel=row_kernel
    )
    residual = None
    rows = torch.arange(n, device=device)
    last = len(model.layers) - 1
    for i, layer in enumerate(model.layers):
        if i == recompute_layers:
            rows = _select(att, ref, ref_pos, new_pos, matched, recompute_fraction, inv_freq)
            if rows.numel() == 0:
                break
            assert residual is not None  # set by the first layer
            x, residual, cos, sin = x[rows], residual[rows], cos[rows], sin[rows]
            att.keep(rows)
        if i == last:  # only its KV is needed: skip its attention output and MLP
            _write_last_kv(layer, x, residual, cos, sin, att, ops)
            break
        x, residual = layer(x, residual, cos, sin, att, ops)
    num_recomputed = rows.numel()
    num_reused = int(matched.sum()) - int(matched[rows].sum())
    return BlendResult(num_reused, num_recomputed)


def _write_last_kv(layer, x, residual, cos, sin, att: RowAttention, ops) -> None:
    """The last layer's KV for the rows, without its attention output or MLP."""

    def write_only(slot, q, k, v):
        if k is not None:
            row_slots = att.all_slots[att.positions]
            kc = att.cache.k[slot].view(-1, *att.cache.k.shape[-2:])
            vc = att.cache.v[slot].view(-1, *att.cache.v.shape[-2:])
            kc[row_slots] = k.to(kc.dtype)
            vc[row_slots] = v.to(vc.dtype)
        return q  # [R, Hq, D]: any tensor of the output's shape; o_proj's result is dropped

    h, _ = layer.input_layernorm.fused(x, residual, ops)
    layer.self_attn(h, cos, sin, write_only, ops)


@torch.inference_mode()
def extend(
    model,
    cache,
    table: list[int],
    token_ids: torch.Tensor,
    start: int,
    *,
    row_kernel: bool | None = None,
) -> torch.Tensor:
    """Plain computation of positions [start, start + n) over the cached [0, start):
    final-normed hidden [n, H] (for logits). The bench's continuation pass."""
    device = cache.k.device
    n = token_ids.shape[0]
    slots = slots_of(table, cache.block_size, 0, start + n, device)
    pos = torch.arange(start, start + n, device=device)
    x = model.embed_tokens(token_ids.to(device))
    ops = model.kernels
    cos, sin = model.rotary.cos_sin_half(pos)  # [n, D/2] fp32 each
    att = RowAttention(
        cache, slots, pos, model.config.sm_scale, causal=start == 0, kernel=row_kernel
    )
    residual = None
    for layer in model.layers:
        x, residual = layer(x, residual, cos, sin, att, ops)
    return model.norm.fused(x, residual, ops)[0]
