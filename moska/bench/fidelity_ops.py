"""Faster exact CPU attention for the fidelity benchmark's engine.

The engine's "torch" attention (its CPU default) runs the shared-chunk attention and the
LSE merge as the kernels' references: one Python iteration per (row, KV head, chunk)
selection, which for prompts of hundreds of tokens over dozens of chunks is most of a CPU
benchmark's time. These two compute the same thing batched per chunk (attention) and with
scatter reductions (merge); tests/routing/test_fidelity_ops.py checks them against the
references. ``speed_up(engine)`` swaps them into one engine's attention table.
"""

from __future__ import annotations

import dataclasses

import torch

from moska.kernels.shared_attention import grouped_shared_attention_ref
from moska.kernels.shared_inputs import chunk_table


def grouped_shared_by_chunk(q, k_pool, v_pool, chunk_offsets, sel, sm_scale, kv_scales=None):
    """grouped_shared_attention_ref, one batched product per chunk: (o [N,G,D], lse [N,G])."""
    if kv_scales is not None:
        return grouped_shared_attention_ref(
            q, k_pool, v_pool, chunk_offsets, sel, sm_scale, kv_scales
        )
    n = sel.req.numel()
    B, hq, d = q.shape
    hkv = k_pool.shape[1]
    g = hq // hkv
    o = torch.zeros(n, g, d, dtype=torch.float32, device=q.device)
    lse = torch.full((n, g), float("-inf"), dtype=torch.float32, device=q.device)
    if n == 0:
        return o, lse
    table = chunk_table(chunk_offsets)
    starts, ends = table.starts.tolist(), table.ends.tolist()
    qg = q.float().view(B, hkv, g, d)
    chunk = sel.chunk.long()
    for c in torch.unique(chunk).tolist():
        if ends[c] <= starts[c]:
            continue
        idx = (chunk == c).nonzero().squeeze(1)
        r, h = sel.req[idx].long(), sel.kv_head[idx].long()
        k = k_pool[starts[c] : ends[c]].float().transpose(0, 1)[h]  # [m, L, D]
        v = v_pool[starts[c] : ends[c]].float().transpose(0, 1)[h]
        s = torch.einsum("mgd,mld->mgl", qg[r, h], k) * sm_scale
        lse[idx] = torch.logsumexp(s, -1)
        o[idx] = torch.einsum("mgl,mld->mgd", torch.softmax(s, -1), v)
    return o, lse


def merge_selections_scatter(o_base, lse_base, o_sel, lse_sel, sel):
    """merge_selections_ref with scatter reductions: (o [B,Hq,D] fp32, lse [B,Hq] fp32)."""
    b, hq, d = o_base.shape
    g = o_sel.shape[1]
    dev = o_base.device
    heads = sel.kv_head.long()[:, None] * g + torch.arange(g, device=dev)  # [N, G]
    rows = (sel.req.long()[:, None] * hq + heads).flatten()  # [N*G] flat (req, q head)
    all_rows = torch.cat([torch.arange(b * hq, device=dev), rows])
    all_lse = torch.cat([lse_base.float().flatten(), lse_sel.float().flatten()])
    all_o = torch.cat([o_base.float().reshape(-1, d), o_sel.float().reshape(-1, d)])
    peak = torch.full((b * hq,), float("-inf"), device=dev)
    peak = peak.scatter_reduce(0, all_rows, all_lse, "amax")
    safe = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    w = torch.exp(all_lse - safe[all_rows])  # [M]; -inf states weigh 0
    total = torch.zeros(b * hq, device=dev).index_add(0, all_rows, w)
    num = torch.zeros(b * hq, d, device=dev).index_add(
        0, all_rows, w[:, None] * torch.nan_to_num(all_o)
    )
    o = torch.where(total[:, None] > 0, num / total.clamp_min(1e-38)[:, None], num)
    lse = torch.where(total > 0, total.log() + safe, torch.full_like(total, float("-inf")))
    return o.view(b, hq, d), lse.view(b, hq)


def speed_up(engine) -> bool:
    """Swap the two into an engine whose attention is "torch"; True when swapped."""
    runner = engine.runner
    if runner.ops.name != "torch":
        return False
    ops = dataclasses.replace(
        runner.ops,
        grouped_shared=grouped_shared_by_chunk,
        merge_selections=merge_selections_scatter,
    )
    runner.ops = ops
    runner.attention.ops = ops
    return True
