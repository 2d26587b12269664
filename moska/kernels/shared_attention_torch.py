"""Batched plain-PyTorch grouped shared-chunk attention and selection merge: the engine's
"torch" ops (its CPU path).

The references (`shared_attention_ref.py`, `merge.merge_selections_ref`) run one Python
iteration per (row, KV head, chunk) selection; that is what they are for, but as the CPU
engine's ops they made a library request of a 200-character prompt over the 4.4k-token
demo library take 4 s alone (1 s was Python per selection; before session 22). These
compute the same thing with one batched product per (chunk, KV head) segment of the
selections and the merge with scatter reductions; `tests/kernels/test_shared_attention_torch.py`
checks them against the references (fp32 and fp16, FP8 scales, chunk scales, a rotation,
empty chunks, rows with no state). Session 19's fidelity benchmark swapped an earlier form
of these into its engine only (`bench/fidelity_ops.py`, now gone).
"""

from __future__ import annotations

import torch

from .shared_attention_ref import checked_q
from .shared_inputs import chunk_scale_args, chunk_table


def _dequant(t: torch.Tensor, scales, rows: slice, c: int, h: int, per_token: bool):
    """Chunk c's rows `rows` of KV head h in fp32, times their e4m3 scale when given."""
    x = t[rows, h].float()
    if scales is None:
        return x
    return x * (scales[rows, h, None].float() if per_token else scales[c, h].float())


def grouped_shared_attention_torch(
    q,
    k_pool,
    v_pool,
    chunk_offsets,
    sel,
    sm_scale,
    kv_scales=None,
    chunk_scales=None,
    q_rotation=None,
):
    """`grouped_shared_attention_ref`'s result ((o [N,G,D] fp32, lse [N,G] fp32), the same
    arguments) with one product per (chunk, KV head) segment of `sel`, in any order."""
    q32 = checked_q(q, k_pool, kv_scales, q_rotation)
    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    g = hq // hkv
    table = chunk_table(chunk_offsets)
    chunk_scale_args(q, chunk_scales, table)
    n = sel.req.numel()
    o = torch.zeros(n, g, d, dtype=torch.float32, device=q.device)
    lse = torch.full((n, g), float("-inf"), dtype=torch.float32, device=q.device)
    if n == 0:
        return o, lse
    per_token = kv_scales is not None and kv_scales[0].shape[0] == k_pool.shape[0]
    k_sc, v_sc = (None, None) if kv_scales is None else kv_scales
    factors = None if chunk_scales is None else chunk_scales.tolist()
    starts, ends = table.starts.tolist(), table.ends.tolist()
    qg = q32.view(b, hkv, g, d)
    key = sel.chunk.long() * hkv + sel.kv_head.long()
    order = torch.argsort(key, stable=True)
    segs, counts = torch.unique_consecutive(key[order], return_counts=True)
    req = sel.req.long()[order]
    at = 0
    for seg, m in zip(segs.tolist(), counts.tolist()):
        idx, rows_of = order[at : at + m], req[at : at + m]
        at += m
        c, h = divmod(seg, hkv)
        rows = slice(starts[c], ends[c])
        if ends[c] <= starts[c]:
            continue  # an absent chunk attends to nothing
        k = _dequant(k_pool, k_sc, rows, c, h, per_token)  # [L, D]
        v = _dequant(v_pool, v_sc, rows, c, h, per_token)
        scale = sm_scale if factors is None else sm_scale * factors[c]
        s = (qg[rows_of, h] @ k.T) * scale  # [m, G, L]
        lse[idx] = torch.logsumexp(s, -1)
        o[idx] = torch.softmax(s, -1) @ v
    return o, lse


def merge_selections_torch(o_base, lse_base, o_sel, lse_sel, sel):
    """`merge_selections_ref`'s result ((o [B,Hq,D] fp32, lse [B,Hq] fp32)) with scatter
    reductions: each (row, query head)'s states weighed by exp(lse - their max); a state
    of lse -inf weighs 0, and a row whose states all have -inf gets o 0, lse -inf."""
    b, hq, d = o_base.shape
    g = o_sel.shape[1]
    dev = o_base.device
    heads = sel.kv_head.long()[:, None] * g + torch.arange(g, device=dev)  # [N, G]
    rows = (sel.req.long()[:, None] * hq + heads).flatten()  # [N*G] flat (row, q head)
    base_lse = lse_base.float().flatten()
    sel_lse = lse_sel.float().flatten()
    peak = base_lse.scatter_reduce(0, rows, sel_lse, "amax")
    safe = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    w_base = torch.exp(base_lse - safe)  # [B*Hq]
    w_sel = torch.exp(sel_lse - safe[rows])  # [N*G]
    total = w_base.index_add(0, rows, w_sel)
    o_b = torch.nan_to_num(o_base.float().reshape(-1, d))
    o_s = torch.nan_to_num(o_sel.float().reshape(-1, d))
    num = (w_base[:, None] * o_b).index_add(0, rows, w_sel[:, None] * o_s)
    o = torch.where(total[:, None] > 0, num / total.clamp_min(1e-38)[:, None], num)
    lse = torch.where(total > 0, total.log() + safe, torch.full_like(total, float("-inf")))
    return o.view(b, hq, d), lse.view(b, hq)
