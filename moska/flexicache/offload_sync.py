"""A deferred re-ranking's slot allocation, evictions and fetches for every layer at once
(`sync_layers`; `OffloadBatch.sync` does one layer).

Why: after the forward (`FlexiStep.rank_after`) every layer's new kept pages are known
together, and one layer's sync issued about 70 small ops from Python (slot picks, fetch
lists, a gather from the host copies, the writes into the pool slots for K and V): 2,000+
launches per re-ranking at 32 layers. Each layer's slots are independent (a pool block
holds a slot per head in every layer), so the (request, layer) pairs are rows of one batch:
one slot pick, one fetch list, one in-place gather per K and V over every request's host
copy and layer (`offload.host_row_offsets`), one write into the cache [L, N, bs, Hkv, D].
"""

from __future__ import annotations

import torch

from moska.flexicache.offload import (
    OffloadBatch,
    assign_slots,
    first_needed,
    gather_pages,
    gather_shifted,
    host_row_offsets,
)
from moska.flexicache.transfer import to_device

# fetch-list entries (pages) per call: its temporaries' size (256 MiB of K rows of 16 x 128
# bf16; the value measured on the H200; 1 << 18 would make every layer of B = 23 one call)
MAX_ENTRIES = 1 << 16


def layer_chunks(b: OffloadBatch, n_layers: int) -> list[range]:
    """Consecutive layers whose fetch lists (padded to their bound) hold at most
    `MAX_ENTRIES` pages together (at B = 38, K = 32, 6 stable heads: 8 layers, ~250 MB of
    K rows), so that a sync of all layers does not hold every layer's rows at once."""
    per = max(1, len(b.due) * max(max(lim) for lim in b.limits))
    step = max(1, MAX_ENTRIES // per)
    return [range(lo, min(lo + step, n_layers)) for lo in range(0, n_layers, step)]


def sync_layers(b: OffloadBatch, keep: torch.Tensor, layers: range, k_cache, v_cache):
    """Make the pages `keep` [len(due), len(layers), Hkv, >= Pm] of the due requests
    resident in `layers` (consecutive; `OffloadBatch.sync` for several layers). Returns
    (fetched, evicted) device counts."""
    offs = [b.offs[i] for i in b.due]
    hkv, pm, ix = offs[0].hkv, b.pm, b.ix
    r, n_layers = keep.shape[0], keep.shape[1]
    lo, hi = layers.start, layers.stop
    rows = r * n_layers
    keep = keep[..., :pm] & b.due_cols[:, None, None, :]
    lslot = b.lslot[ix, lo:hi]  # [R, n, Hkv, Pm], a copy
    cap = b.cap.repeat_interleave(n_layers)
    need, slot, evicted = assign_slots(
        lslot.view(rows, hkv, pm), keep.reshape(rows, hkv, pm), cap, b.n_cap
    )
    b.lslot[ix, lo:hi] = lslot
    b.slot[ix, lo:hi] = b._global(b.due_pool, lslot)
    b.dirty = True
    limits = [n for j in range(r) for n in (b.limits[lay][j] for lay in layers)]
    limit = max(limits)
    if not limit:
        return need.new_zeros((), dtype=torch.int64), evicted.sum()
    order, used = first_needed(need, limit)  # [R * L, limit]
    dev = order.device
    used = used & (torch.arange(limit, device=dev)[None, :] < to_device(limits, dev)[:, None])
    pool = b.due_pool.repeat_interleave(n_layers, 0)
    dst = pool.gather(1, slot.gather(1, order))  # cache slots (block * Hkv + head)
    src = (order % pm) * hkv + order // pm  # rows of a (request, layer) host copy
    layer = torch.arange(lo, hi, device=dev).repeat(r)[:, None].expand(-1, limit)
    flat_used = used.reshape(-1)
    # the unused entries write the first used entry's value again (or, none used, the first
    # entry its own slot's content): an index written twice gets one value
    first = flat_used.to(torch.int64).argmax().view(1)
    some = flat_used.any().view(1)
    lay_f, dst_f = layer.reshape(-1), dst.reshape(-1)
    lay0 = torch.where(some, lay_f.gather(0, first), lay_f[:1])
    d0 = torch.where(some, dst_f.gather(0, first), dst_f[:1])
    lay_w = torch.where(flat_used, lay_f, lay0)
    dst_w = torch.where(flat_used, dst_f, d0)
    blk, head = dst_w // hkv, dst_w % hkv
    _, _, bs, _, d = k_cache.shape
    for cache, name in ((k_cache, "host_k"), (v_cache, "host_v")):
        got = _gather(offs, name, layers, src, used).view(-1, bs, d)
        old = cache[lay0, d0 // hkv, :, d0 % hkv]  # [1, bs, D]
        r0 = torch.where(some[:, None, None], got.index_select(0, first), old.to(got.dtype))
        vals = torch.where(flat_used[:, None, None], got, r0)
        cache[lay_w, blk, :, head] = vals.to(cache.dtype)
    return used.sum(), evicted.sum()


def _gather(offs, name: str, layers: range, src, used) -> torch.Tensor:
    """[R * n * limit, row]: each (request, layer) row's host rows `src` (one in-place read
    of every pinned host copy on CUDA; an index per (request, layer) otherwise)."""
    hosts = [getattr(o, name) for o in offs]  # [L, pages, Hkv, bs, D]
    row = hosts[0].shape[-2] * hosts[0].shape[-1]
    if hosts[0].device != src.device:
        per_layer = [host_row_offsets(hosts, lay) for lay in layers]
        if all(offsets is not None for _, offsets in per_layer):
            base = per_layer[0][0]  # the lowest copy: the same for every layer
            shift = [off[j] for j in range(len(hosts)) for _, off in per_layer if off is not None]
            if (out := gather_shifted(base, shift, src, used)) is not None:
                return out
    parts = []
    for j, h in enumerate(hosts):
        for i, lay in enumerate(layers):
            k = j * len(layers) + i
            parts.append(gather_pages(h[lay].view(-1, row), src[k], used[k]))
    return torch.cat(parts)
