"""The strongest plain-PyTorch baseline we know for the routed decode-attention step.

The step: B requests, each reading its top-k chunks of a shared pool [S, Hkv, D] (chunk c
is rows offs[c]:offs[c+1]) plus its own U unique tokens, merged by LSE. The baseline:

1. shared part: ONE flash varlen launch over every touched chunk. Each request's G query
   heads of a KV head are packed as G rows (so each chunk's K/V is read once per KV head
   for all its rows, as in moska); the rows of a chunk are cut into tiles of `tile` rows;
   tile j addresses its chunk *in place* in the pool: cu_seqlens_k[j] = offs[chunk] and
   seqused_k[j] = the chunk's length (FlashAttention-2 reads keys [cu_k[j], cu_k[j] +
   seqused_k[j]) and needs no monotonic cu_seqlens_k then). The tile count is bounded
   statically (ceil(rows / tile) + touched chunks), empty tiles have no rows, and every
   index is built on the device without a host sync, so the step can be a CUDA graph.
2. unique part: cuDNN SDPA (or flash) on [B, Hkv, G rows, U] with its LSE.
3. merge: torch LSE merge of the k shared partials and the unique one per request.

`varlen_reference` is the same varlen contract in plain torch (a loop over tiles): it runs
the plan on CPU (the flash path is CUDA-only) and checks the plan against it on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VarlenPlan:
    """Tiles of one varlen launch: packed query rows [cu_q[j], cu_q[j+1]) of tile j read
    keys [cu_k[j], cu_k[j] + used_k[j]) of the pool. T tiles (a static bound)."""

    cu_q: torch.Tensor  # [T + 1] int32, non-decreasing
    cu_k: torch.Tensor  # [T + 1] int32, any order (the last entry unused)
    used_k: torch.Tensor  # [T] int32, 0 for empty tiles
    max_q: int  # = tile


def tile_plan(pair_chunk: torch.Tensor, offs: torch.Tensor, g: int, tile: int) -> VarlenPlan:
    """Plan for pairs sorted by chunk (pair_chunk [P]), each pair giving g packed rows."""
    c = offs.numel() - 1
    p = pair_chunk.numel()
    dev = pair_chunk.device
    rows = torch.zeros(c, dtype=torch.int64, device=dev)
    rows.index_add_(0, pair_chunk.long(), torch.full((p,), g, dtype=torch.int64, device=dev))
    tiles = (rows + tile - 1) // tile  # [C]
    tile_end = torch.cumsum(tiles, 0)  # inclusive
    row_start = torch.cumsum(rows, 0) - rows
    n_tiles = -(-p * g // tile) + min(c, p)  # static bound on sum(tiles)
    j = torch.arange(n_tiles, device=dev)
    chunk = torch.searchsorted(tile_end, j, right=True)  # C for the padding tiles
    valid = chunk < c
    cc = chunk.clamp(max=c - 1)
    local = j - (tile_end[cc] - tiles[cc])
    start = torch.where(valid, row_start[cc] + local * tile, p * g)
    end = torch.full((1,), p * g, dtype=torch.int64, device=dev)
    cu_q = torch.cat([start, end]).to(torch.int32)
    k0 = torch.where(valid, offs[cc].long(), 0)
    cu_k = torch.cat([k0, torch.zeros(1, dtype=torch.int64, device=dev)]).to(torch.int32)
    used = torch.where(valid, (offs[cc + 1] - offs[cc]).long(), 0).to(torch.int32)
    return VarlenPlan(cu_q, cu_k, used, tile)


def varlen_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash varlen's contract in plain torch: q [R, H, D], k/v [S, H, D] -> o [R, H, D],
    lse [H, R] (fp32), tile by tile as the plan addresses them."""
    o = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    cu_q, cu_k, used = plan.cu_q.tolist(), plan.cu_k.tolist(), plan.used_k.tolist()
    for t in range(len(used)):
        q0, q1, k0 = cu_q[t], cu_q[t + 1], cu_k[t]
        if q1 == q0:
            continue
        kt, vt = k[k0 : k0 + used[t]].float(), v[k0 : k0 + used[t]].float()
        s = torch.einsum("rhd,khd->hrk", q[q0:q1].float(), kt) * scale  # [H, r, k]
        lse[:, q0:q1] = torch.logsumexp(s, -1)
        o[q0:q1] = torch.einsum("hrk,khd->rhd", torch.softmax(s, -1), vt).to(q.dtype)
    return o, lse


def _flash_varlen(q, k, v, plan: VarlenPlan, scale: float, max_k: int):
    o, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, plan.cu_q, plan.cu_k, plan.max_q, max_k, 0.0, False, False,
        scale=scale, seqused_k=plan.used_k,
    )[:2]  # fmt: skip
    return o, lse


def _unique(q4: torch.Tensor, k_u: torch.Tensor, v_u: torch.Tensor, scale: float, backend: str):
    """q4 [B, Hkv, G, D]; k_u/v_u [B, U, Hkv, D] -> o [B, Hkv, G, D], lse [B, Hkv, G]."""
    b, hkv, g, _ = q4.shape
    if backend == "cudnn":
        o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q4, k_u.transpose(1, 2), v_u.transpose(1, 2), None, True, 0.0, False, False,
            scale=scale,
        )[:2]  # fmt: skip
        return o, lse.reshape(b, hkv, g)
    if backend == "flash":
        o, lse = torch.ops.aten._flash_attention_forward(
            q4.transpose(1, 2), k_u, v_u, None, None, g, k_u.shape[1], 0.0, False, False,
            scale=scale,
        )[:2]  # fmt: skip
        return o.transpose(1, 2), lse.reshape(b, hkv, g)
    s = torch.einsum("bhgd,buhd->bhgu", q4.float(), k_u.float()) * scale  # "torch": reference
    return torch.einsum("bhgu,buhd->bhgd", torch.softmax(s, -1), v_u.float()), s.logsumexp(-1)


def baseline_step(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    offs: torch.Tensor,
    pair_req: torch.Tensor,
    pair_chunk: torch.Tensor,
    k_u: torch.Tensor,
    v_u: torch.Tensor,
    scale: float,
    tile: int = 128,
    unique: str = "cudnn",
    max_chunk: int | None = None,
) -> torch.Tensor:
    """One routed decode-attention step: q [B, Hq, D]; pairs [B * topk] sorted by (chunk,
    req), every request in topk of them; unique KV [B, U, Hkv, D] -> out [B, Hq, D].
    On CPU (or unique="torch") the varlen launch runs as varlen_reference."""
    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    g = hq // hkv
    p = pair_req.numel()
    topk = p // b
    plan = tile_plan(pair_chunk, offs, g, tile)
    qs = q[pair_req].view(p, hkv, g, d).transpose(1, 2).reshape(p * g, hkv, d)  # packed rows
    if q.is_cuda:
        max_k = max_chunk or int((offs[1:] - offs[:-1]).max())
        o_s, lse_s = _flash_varlen(qs, k_pool, v_pool, plan, scale, max_k)
    else:
        o_s, lse_s = varlen_reference(qs, k_pool, v_pool, plan, scale)
    o_s = o_s.view(p, g, hkv, d).transpose(1, 2).reshape(p, hq, d)
    lse_s = lse_s.view(hkv, p, g).permute(1, 0, 2).reshape(p, hq)
    o_u, lse_u = _unique(q.view(b, hkv, g, d), k_u, v_u, scale, unique if q.is_cuda else "torch")
    # merge by LSE: each request's topk shared partials and its unique one
    by_req = torch.argsort(pair_req, stable=True)
    lse_all = torch.cat([lse_s[by_req].view(b, topk, hq), lse_u.reshape(b, 1, hq)], 1).float()
    o_all = torch.cat([o_s[by_req].view(b, topk, hq, d), o_u.reshape(b, 1, hq, d)], 1)
    w = torch.softmax(lse_all, 1)  # exp(lse_i - logsumexp(lse))
    return (w[..., None] * o_all.float()).sum(1).to(q.dtype)


def dense_reference(q, k_pool, v_pool, offs, pair_req, pair_chunk, k_u, v_u, scale):
    """Each request over the concatenation of its chunks and its unique KV (fp32)."""
    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    out = torch.empty(b, hq, d, dtype=torch.float32, device=q.device)
    for r in range(b):
        chunks = pair_chunk[pair_req == r].tolist()
        ks = [k_pool[offs[c] : offs[c + 1]] for c in chunks] + [k_u[r]]
        vs = [v_pool[offs[c] : offs[c + 1]] for c in chunks] + [v_u[r]]
        kk = torch.cat(ks).float().repeat_interleave(hq // hkv, 1)  # [N, Hq, D]
        vv = torch.cat(vs).float().repeat_interleave(hq // hkv, 1)
        s = torch.einsum("hd,nhd->hn", q[r].float(), kk) * scale
        out[r] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), vv)
    return out
