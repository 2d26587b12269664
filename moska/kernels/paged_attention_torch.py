"""Plain-PyTorch paged attention for the engine's "torch" table (its CPU path): the
reference's result, computed per request over blocks of query rows.

`paged_attention.paged_attention_ref` scores each request's whole [Hq, q_len, L] at once,
with K and V repeated per query head: for a long prefill (the demo library's 4.4k tokens
on first start) that is five full passes over 77M scores per layer, half of them masked.
Here each block of `block_q` query rows scores only the keys up to its last row, K and V
are read per KV head without the repeat, and the mask covers only the block's diagonal
part; decode rows (one per request) are one block. Checked against the reference in
`tests/kernels/test_paged_attention_torch.py`.
"""

from __future__ import annotations

import torch

BLOCK_Q = 256  # query rows scored at once


def paged_attention_torch(
    q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, sm_scale, block_q: int = BLOCK_Q
):
    """`paged_attention_ref`'s result ((o [T, Hq, D] fp32, lse [T, Hq] fp32), the same
    arguments: causal over paged KV; decode when cu_q_lens = arange(B + 1))."""
    t_total, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    o = torch.zeros(t_total, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((t_total, hq), float("-inf"), dtype=torch.float32, device=q.device)
    cu = cu_q_lens.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q_len = cu[b + 1] - cu[b]
        if q_len == 0:
            continue
        blocks = block_tables[b, : -(-seq_len // bs)].long()
        k = k_cache[blocks].reshape(-1, hkv, d)[:seq_len].float()  # [L, Hkv, D]
        v = v_cache[blocks].reshape(-1, hkv, d)[:seq_len].float()
        past = seq_len - q_len  # keys before the request's first query row
        for a in range(0, q_len, block_q):
            e = min(a + block_q, q_len)
            keys = past + e  # the block's last row sees keys [0, keys)
            rows = slice(cu[b] + a, cu[b] + e)
            qb = q[rows].float().view(e - a, hkv, g, d)
            s = torch.einsum("qhgd,khd->hgqk", qb, k[:keys]) * sm_scale  # [Hkv, G, n, keys]
            if e - a > 1:  # row i sees keys up to past + a + i
                pos = torch.arange(past + a, past + e, device=q.device)
                masked = torch.arange(keys, device=q.device)[None, :] > pos[:, None]
                s = s.masked_fill(masked, float("-inf"))
            lse[rows] = torch.logsumexp(s, -1).permute(2, 0, 1).reshape(e - a, hq)
            p = torch.softmax(s, -1)
            o[rows] = torch.einsum("hgqk,khd->qhgd", p, v[:keys]).reshape(e - a, hq, d)
    return o, lse
