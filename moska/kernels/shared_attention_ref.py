"""Plain-PyTorch reference of grouped shared-chunk attention (`shared_attention.py`)."""

import torch

from .shared_inputs import chunk_scale_args, chunk_table


def checked_q(q, k_pool, kv_scales=None, q_rotation=None):
    """q in fp32, read as q R when K is stored rotated (`q_rotation` R [D, D]), after the
    checks the plain-PyTorch forms share: e4m3 pools come with `kv_scales`, and only they."""
    if (k_pool.dtype == torch.float8_e4m3fn) != (kv_scales is not None):
        raise ValueError("kv_scales go with float8_e4m3fn pools, and only with them")
    if q_rotation is None:
        return q.float()
    d = q.shape[-1]
    if tuple(q_rotation.shape) != (d, d):
        raise ValueError(f"q_rotation must be [D, D] = {(d, d)}, got {tuple(q_rotation.shape)}")
    return q.float() @ q_rotation.float()


def grouped_shared_attention_ref(
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
    """Plain-PyTorch reference, one selection at a time in fp32: (o [N,G,D] fp32, lse [N,G] fp32).
    `kv_scales` (k_scale, v_scale) [C, Hkv]: an e4m3 chunk's K/V are stored values x scale.
    `chunk_scales` [C]: chunk c's scores use sm_scale x chunk_scales[c].
    `q_rotation` [D, D]: K is stored rotated (k R), so q is read as q R (in fp32 here)."""
    q = checked_q(q, k_pool, kv_scales, q_rotation)
    n = sel.req.numel()
    hq, d = q.shape[1], q.shape[2]
    g = hq // k_pool.shape[1]
    o = torch.zeros(n, g, d, dtype=torch.float32, device=q.device)
    lse = torch.full((n, g), float("-inf"), dtype=torch.float32, device=q.device)
    table = chunk_table(chunk_offsets)
    chunk_scale_args(q, chunk_scales, table)
    factors = None if chunk_scales is None else chunk_scales.tolist()
    starts, ends = table.starts.tolist(), table.ends.tolist()
    for i, (r, h, c) in enumerate(zip(sel.req.tolist(), sel.kv_head.tolist(), sel.chunk.tolist())):
        k = k_pool[starts[c] : ends[c], h].float()  # [L, D]
        v = v_pool[starts[c] : ends[c], h].float()
        if kv_scales is not None and kv_scales[0].shape[0] == k_pool.shape[0]:  # per token
            rows = slice(starts[c], ends[c])
            k = k * kv_scales[0][rows, h, None].float()
            v = v * kv_scales[1][rows, h, None].float()
        elif kv_scales is not None:  # per (chunk, KV head)
            k, v = k * kv_scales[0][c, h].float(), v * kv_scales[1][c, h].float()
        if k.shape[0] == 0:
            continue
        scale = sm_scale if factors is None else sm_scale * factors[c]
        s = q[r, h * g : (h + 1) * g].float() @ k.T * scale  # [G, L]
        lse[i] = torch.logsumexp(s, -1)
        o[i] = torch.softmax(s, -1) @ v
    return o, lse
