"""A deferred re-ranking's page scores for every layer in one batch of ops
(`FlexiStep.rank_after`, centroid ranking over the one [L, N, bs, Hkv, D] cache).

Why: scoring layer by layer issued ~15 small ops per layer (a gather of the pages not yet
released, their mean keys, the released pages' mean keys put in, the estimated mass): ~500
launches per re-ranking at 32 layers. Here the layers are rows of one batch, in chunks
whose temporaries (every page's mean key, the gathered keys of the pages not yet released:
a request not yet handed off has every page in the cache) stay under `MAX_BYTES`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moska.flexicache import policy

if TYPE_CHECKING:
    from moska.flexicache.engine_step import FlexiStep

MAX_BYTES = 1 << 30  # a chunk's fp32 mean keys of every page and gathered keys (per layer
# at B = 36, 288 pages: 42 MB: 24 layers a chunk)


def scores_all(step: FlexiStep, q_buf: torch.Tensor, k_caches, sm_scale: float) -> torch.Tensor:
    """[B, L, Hkv, P] scores of every layer for the queries `q_buf` [L, B, Hq, D]; the
    layer-by-layer `FlexiStep._scores` where the cache is not one tensor or the ranking is
    not by centroids."""
    eng = step.eng
    n_layers = eng.num_layers
    if eng.cfg.rank_by != "centroid" or not isinstance(k_caches, torch.Tensor):
        per = [step._scores(lay, q_buf[lay], k_caches[lay], sm_scale) for lay in range(n_layers)]
        return torch.stack(per, 1)
    p0, bs = step.p0, eng.block_size
    tables = step.block_tables[:, p0:]  # [B, P - p0]
    b, tail_p = tables.shape
    _, _, _, hkv, d = k_caches.shape
    per_layer = b * hkv * d * 4 * (p0 + tail_p + tail_p * bs)  # mean keys + gathered keys
    chunk = max(1, min(n_layers, MAX_BYTES // max(per_layer, 1)))
    n_tok = step.seq_lens - p0 * bs
    out = []
    for lo in range(0, n_layers, chunk):
        hi = min(lo + chunk, n_layers)
        n = hi - lo
        keys = k_caches[lo:hi][:, tables]  # [n, B, P', bs, Hkv, D]
        keys = keys.permute(0, 1, 4, 2, 3, 5).reshape(n * b, hkv, tail_p, bs, d)
        tail, count = policy.page_centroids(keys, n_tok.repeat(n))
        if p0:
            kmean = tail.new_empty(n * b, hkv, p0 + tail_p, d)
            kmean[:, :, p0:] = tail
            count = F.pad(count, (p0, 0), value=float(bs))
        else:
            kmean = tail
        if step.offs:  # released pages: their mean keys kept on the device
            src = torch.cat([off.kmean[lo:hi] for _, off in step.offs], 2)  # [n, Hkv, S, D]
            k5 = kmean.view(n, b, hkv, -1, d)
            k5[:, step.k_rows, :, step.k_pages] = src.permute(2, 0, 1, 3)
        q = q_buf[lo:hi].reshape(n * b, *q_buf.shape[2:])
        s = policy.centroid_mass(q, kmean, count, sm_scale).view(n, b, hkv, -1)
        hook = eng.score_hook
        if hook is not None:  # a bench's rankings (a random model's churn)
            layers = getattr(hook, "layers", None)  # the hook for several layers at once
            if layers is not None:
                s = layers(lo, s)
            else:
                s = torch.stack([hook(lo + j, s[j]) for j in range(n)])
        out.append(s)
    return torch.cat(out).transpose(0, 1).contiguous()
