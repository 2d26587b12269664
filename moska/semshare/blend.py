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
so a row sees reference KV where its neighbours were not recomputed (`row_attention.py`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch

from moska.kernels import rope_scatter as rs
from moska.semshare import layer_parts as parts
from moska.semshare.rope_shift import delta_cos_sin, rotate_by
from moska.semshare.row_attention import RowAttention, slots_of
from moska.semshare.store import Reference

if TYPE_CHECKING:
    from moska.semshare.graphs import BlendGraphs


class BlendResult(NamedTuple):
    num_reused: int  # matched tokens whose KV past the first layers came from the reference
    num_recomputed: int  # tokens computed through every layer
    # `finish`: the range's last token's final-normed hidden state [1, H] (for its logits)
    hidden: torch.Tensor | None = None


def _rerotated(ref: Reference, layers, ref_pos: torch.Tensor, new_pos: torch.Tensor, inv_freq):
    """Reference k, v of `layers` at `ref_pos`, keys moved to `new_pos`."""
    idx = ref.rows(ref_pos.to(ref.k.device))
    k = ref.k[layers][:, idx] if isinstance(layers, slice) else ref.k[layers, idx]
    v = ref.v[layers][:, idx] if isinstance(layers, slice) else ref.v[layers, idx]
    return rotate_by(k, (new_pos - ref_pos).to(k.device), inv_freq), v


def _copy_reference(ref: Reference, cache, ref_pos, new_pos, dst_slots, inv_freq) -> None:
    """Every layer's reference k, v of tokens `ref_pos` into the cache at `dst_slots`, keys
    re-rotated to `new_pos`: on CUDA one fused launch (`kernels/rope_scatter.py`), else a
    gather, `rotate_by` and two scatters."""
    flat = (cache.k.shape[0], -1, *cache.k.shape[-2:])
    kc, vc = cache.k.view(flat), cache.v.view(flat)
    if kc.is_cuda and ref.k.is_cuda and rs.supported(ref.k):
        cos, sin = delta_cos_sin(new_pos - ref_pos, inv_freq)
        rs.rope_scatter(ref.k, ref.v, kc, vc, ref.rows(ref_pos), dst_slots, cos, sin)
        return
    k_ref, v_ref = _rerotated(ref, slice(None), ref_pos, new_pos, inv_freq)
    kc[:, dst_slots] = k_ref.to(kc.dtype)
    vc[:, dst_slots] = v_ref.to(vc.dtype)


def row_bucket(rows: int, total: int, granule: int) -> int:
    """`rows` rounded up to a bucket (at most `total`): a multiple of `granule`, or of a
    sixteenth of the power of two below `rows` when that is coarser (<= ~6% more rows, at
    most 16 buckets per octave). Why: every new row count is a new matmul shape, and on an
    H200 cuBLAS picked an algorithm (and lazily loaded its kernel) for each, ~3 ms of host
    time per shape, so a request of a new count ran host-bound; bucketed counts repeat, and
    `SemanticReuse.warm_up` visits every bucket once at start. granule 1: no bucketing."""
    if granule <= 1 or rows <= 0:
        return min(rows, total)
    g = max(granule, 1 << max(0, rows.bit_length() - 5))
    return min(-(-rows // g) * g, total)


def _select(
    att: RowAttention, ref, ref_pos, new_pos, matched, m_idx, fraction, inv_freq, granule=1,
    cand=None,
) -> tuple[torch.Tensor, int]:  # fmt: skip
    """(rows kept past the boundary [R] ascending, how many of them are matched): the
    unmatched rows + the most deviating `fraction` of the matched ones `m_idx`, and more of
    the next most deviating ones until R fills its bucket (`row_bucket`: padding with real
    rows keeps the blend exact, it only recomputes a few more). R is known on the host from
    the counts, so the rows come from a stable sort, not `nonzero` (no host sync between
    the first layers and the rest). `cand`: the matched rows that may be kept (default
    `m_idx`; without the rows in blocks shared with the reference, `sharing.py`); when
    they are too few to fill the bucket, the first kept row fills it, repeated (it computes
    and writes the same values again: exact, and the bucket's graph replays)."""
    n, num_matched = matched.shape[0], m_idx.numel()
    if fraction >= 1.0 or att.last_fresh is None:
        return torch.arange(n, device=matched.device), num_matched
    m_idx = m_idx if cand is None else cand
    n_keep = math.ceil(fraction * num_matched)
    n_keep = row_bucket(n - num_matched + n_keep, n, granule) - (n - num_matched)
    n_keep = min(n_keep, m_idx.numel())
    keep = ~matched
    if n_keep > 0:
        slot, k, v = att.last_fresh
        k_ref, v_ref = _rerotated(ref, slot, ref_pos[m_idx], new_pos[m_idx], inv_freq)
        kf, vf = k[m_idx].float(), v[m_idx].float()
        dev = (kf - k_ref.float()).flatten(1).norm(dim=1) / kf.flatten(1).norm(dim=1).clamp_min(
            1e-6
        ) + (vf - v_ref.float()).flatten(1).norm(dim=1) / vf.flatten(1).norm(dim=1).clamp_min(1e-6)
        keep[m_idx[dev.topk(n_keep).indices]] = True
    r = n - num_matched + n_keep
    rows = torch.argsort((~keep).to(torch.uint8), stable=True)[:r]  # kept rows first, in order
    short = row_bucket(r, n, granule) - r if 0 < r else 0
    if short:  # too few candidates (most rows in shareable blocks): the first row repeated
        rows = torch.cat([rows[:1].expand(short), rows])  # (same values, same slot) to fill it
    return rows, n_keep


@torch.inference_mode()
def blend_prefill(
    model,
    cache,  # PagedKVCache
    table: list[int],  # the request's blocks, covering [0, end)
    token_ids: torch.Tensor,  # [end - start] int64, the prompt's tokens [start, end)
    start: int,
    ref: Reference,
    ref_pos: torch.Tensor,  # [end - start] int64, matched reference position or -1 (host: no sync)
    recompute_fraction: float,
    recompute_layers: int,
    *,
    row_kernel: bool | None = None,
    granule: int = 1,
    graphs: BlendGraphs | None = None,
    finish: bool = False,
    shared: torch.Tensor | None = None,
    fixed: torch.Tensor | None = None,
) -> BlendResult:
    """Compute the KV of prompt positions [start, end) into `cache` (positions before `start`
    must be in it already), reusing `ref` where matched. See the module docstring.
    `row_kernel`: `RowAttention`'s `kernel` (None: the kernel on CUDA). `granule`: the rows
    kept past the boundary fill a `row_bucket` of it (1: exactly the selected rows).
    `graphs`: run the layers past the boundary through it (one CUDA graph replay per blend
    where the row count's graph is captured; its `first` must be `recompute_layers`).
    `finish`: the range's last token is computed through every layer (never reused) and its
    final-normed hidden state returned (`BlendResult.hidden`), so that the engine samples the
    prompt's first token without a forward of its own over the model's weights (a whole
    decode step's weight reads, ~4 ms at 8B dims); None when the first layers are all.
    `shared`: [end - start] bool (host), the tokens in blocks the request took from the
    reference (`sharing.py`: matched there at shift 0, equal tokens): their KV is left as
    it is, in every layer. `fixed` (host, a superset of `shared`): the tokens of every block
    it could take (taken or not), never kept past the boundary, so that sharing and copying
    keep the same rows (`sharing.py`)."""
    device = cache.k.device
    n = token_ids.shape[0]
    end = start + n
    finish = finish and recompute_layers < len(model.layers)
    if finish:  # the last token is a row past the boundary: the last of them (by position)
        ref_pos = ref_pos.clone()
        ref_pos[-1] = -1
    slots = slots_of(table, cache.block_size, 0, end, device)  # [end]
    new_pos = torch.arange(start, end, device=device)  # [n]
    # the matched count fixes every later shape (the rows kept at the boundary, the counts
    # returned): from a host ref_pos (the plan's) counted on the host, no sync; from a device
    # one, the blend's one host sync, before any of its layers is queued
    on_host = ref_pos.device.type == "cpu"
    m_idx = (ref_pos >= 0).nonzero().squeeze(1) if on_host else None
    host_pos = ref_pos
    ref_pos = ref_pos.to(device, non_blocking=True)
    matched = ref_pos >= 0
    inv_freq = model.rotary.inv_freq
    if m_idx is None:
        m_idx = matched.nonzero().squeeze(1)
    else:  # pageable host memory: staged at once, no wait on the stream
        m_idx = m_idx.to(device, non_blocking=True)
    num_matched = m_idx.numel()
    c_idx = k_idx = m_idx  # matched rows whose KV is copied / which may be kept
    if fixed is not None:
        assert on_host and recompute_layers == 1 and recompute_fraction < 1.0, "see sharing.py"
        assert shared is None or not bool((shared & ~fixed).any())
        k_idx = ((host_pos >= 0) & ~fixed).nonzero().squeeze(1).to(device, non_blocking=True)
    if shared is not None:
        assert fixed is not None and not (finish and bool(shared[-1])), "see sharing.py"
        c_idx = ((host_pos >= 0) & ~shared).nonzero().squeeze(1).to(device, non_blocking=True)
    if c_idx.numel() and recompute_layers < len(model.layers):
        m_pos = ref_pos[c_idx]
        _copy_reference(ref, cache, m_pos, new_pos[c_idx], slots[start:][c_idx], inv_freq)
    x = model.embed_tokens(token_ids.to(device, non_blocking=True))  # [n, H]
    ops = model.kernels  # the engine's kernel table
    cos, sin = model.rotary.cos_sin_half(new_pos)  # [n, D/2] fp32 each
    att = RowAttention(
        cache, slots, new_pos, model.config.sm_scale, causal=start == 0, kernel=row_kernel,
        ops=ops,
    )  # fmt: skip
    att.skip_writes(shared)
    residual = None
    num_layers = len(model.layers)
    boundary = min(recompute_layers, num_layers) - 1  # the last layer over every token
    for i in range(boundary):
        x, residual = model.layers[i](x, residual, cos, sin, att, ops)
    layer = model.layers[boundary]
    if boundary == num_layers - 1:  # only its KV is needed: skip its attention output and MLP
        _write_last_kv(layer, x, residual, cos, sin, att, ops)
        return BlendResult(0, n)
    queries = None
    if layer.self_attn.owns_kv:  # its KV for every token; its attention and MLP wait
        queries, residual = parts.boundary_kv(layer, x, residual, cos, sin, att, ops)
    else:  # an MLKV layer reading an earlier layer's KV: in full
        x, residual = layer(x, residual, cos, sin, att, ops)
    rows, kept_matched = _select(
        att, ref, ref_pos, new_pos, matched, m_idx, recompute_fraction, inv_freq, granule,
        cand=k_idx,
    )  # fmt: skip
    r = rows.numel()  # known on the host (from the counts)
    if r == 0:
        return BlendResult(num_matched, 0)
    assert residual is not None  # set by the first layer
    if r < n:  # the rows past the boundary (all of them: as they were, causal from 0)
        att.keep(rows)
        residual = residual[rows]
        x = x[rows] if queries is None else x
        cos, sin = cos[rows], sin[rows]
    if queries is not None:  # the boundary layer's rest, for the kept rows only
        slot, q = queries
        x, residual = parts.boundary_rest(layer, slot, q[rows] if r < n else q, residual, att, ops)
    if graphs is not None and graphs.serves(cache, recompute_layers, r, end):
        # the rows' layers past the boundary: one replay (or eagerly from the same buffers)
        graphs.run(x, residual, att.positions, slots)
        into_last = graphs.last_x, graphs.last_residual
    else:
        x, residual = tail_layers(model, att, x, residual, cos, sin, recompute_layers)
        into_last = x[-1:], residual[-1:]
    hidden = None
    if finish:
        hidden = finish_last(model, cache, slots, *into_last, new_pos[-1:], row_kernel)
    return BlendResult(num_matched - kept_matched, n - num_matched + kept_matched, hidden)


def tail_layers(model, att: RowAttention, x, residual, cos, sin, first: int):
    """Layers [first, L) over the rows of `att` (x, residual [R, H]; cos, sin [R, D/2]): each
    writes the rows' KV; the last one only that (its attention output and MLP are unused).
    Returns the rows' (x, residual) into the last layer. No host sync, no shape read from a
    tensor: `graphs.BlendGraphs` captures it."""
    ops = model.kernels
    last = len(model.layers) - 1
    for i in range(first, last):
        x, residual = model.layers[i](x, residual, cos, sin, att, ops)
    _write_last_kv(model.layers[last], x, residual, cos, sin, att, ops)
    return x, residual


def finish_last(model, cache, slots, x, residual, position, row_kernel=None) -> torch.Tensor:
    """The last layer in full for one row (x, residual [1, H] into it, at `position` [1]),
    attending over the cache's positions <= its own, then the final norm: [1, H], what the
    engine's forward of that token alone would return (its KV of the last layer rewritten)."""
    ops = model.kernels
    cos, sin = model.rotary.cos_sin_half(position)
    att = RowAttention(cache, slots, position, model.config.sm_scale, kernel=row_kernel, ops=ops)
    x, residual = model.layers[-1](x, residual, cos, sin, att, ops)
    return model.norm.fused(x, residual, ops)[0]


def _write_last_kv(layer, x, residual, cos, sin, att: RowAttention, ops) -> None:
    """The last layer's KV for the rows, without its attention output or MLP."""

    def write_only(slot, q, k, v):
        if k is not None:
            att.write(slot, k, v)
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
        cache, slots, pos, model.config.sm_scale, causal=start == 0, kernel=row_kernel, ops=ops
    )
    residual = None
    for layer in model.layers:
        x, residual = layer(x, residual, cos, sin, att, ops)
    return model.norm.fused(x, residual, ops)[0]
