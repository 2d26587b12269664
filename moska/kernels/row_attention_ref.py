"""Plain-PyTorch reference of `row_attention`: row by row, fp32."""

import torch


def row_attention_ref(
    q: torch.Tensor,  # [R, Hq, D]
    k: torch.Tensor,  # [num_slots, Hkv, D]
    v: torch.Tensor,  # [num_slots, Hkv, D]
    slots: torch.Tensor,  # [S]: slot of key position n
    positions: torch.Tensor,  # [R]
    sm_scale: float,
) -> torch.Tensor:
    """o [R, Hq, D] fp32: row r's softmax over the keys of positions 0..positions[r]."""
    r, hq, d = q.shape
    g = hq // k.shape[1]
    o = torch.zeros(r, hq, d, dtype=torch.float32, device=q.device)
    for i, p in enumerate(positions.tolist()):
        idx = slots[: p + 1].long()
        keys = k[idx].float().repeat_interleave(g, 1)  # [p + 1, Hq, D]
        values = v[idx].float().repeat_interleave(g, 1)
        s = torch.einsum("hd,nhd->hn", q[i].float(), keys) * sm_scale  # [Hq, p + 1]
        o[i] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), values)
    return o
