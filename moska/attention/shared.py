"""Shared-library attention for one group of rows: route to chunks, then one grouped
launch over every (chunk, KV head, tile of rows)."""

from __future__ import annotations

import torch

from moska.attention.metadata import LibraryGroup
from moska.attention.ops import AttentionOps
from moska.kernels.selections import Selections


def all_chunk_selections(
    num_rows: int, num_kv_heads: int, num_chunks: int, device: torch.device
) -> Selections:
    """Every row reads every chunk with every KV head, sorted by (chunk, kv_head, req)."""
    c, h, r = torch.meshgrid(
        torch.arange(num_chunks, device=device),
        torch.arange(num_kv_heads, device=device),
        torch.arange(num_rows, device=device),
        indexing="ij",
    )
    return Selections(
        req=r.reshape(-1).to(torch.int32),
        kv_head=h.reshape(-1).to(torch.int32),
        chunk=c.reshape(-1).to(torch.int32),
    )


def shared_attention_for_group(
    ops: AttentionOps,
    layer: int,
    q_rows: torch.Tensor,  # [n, Hq, D]
    group: LibraryGroup,
    sm_scale: float,
):
    lib = group.library
    k_pool, v_pool = lib.k_pools[layer], lib.v_pools[layer]  # [S, Hkv, D]
    num_kv_heads = k_pool.shape[1]
    if group.top_k >= lib.num_chunks:
        sel = all_chunk_selections(q_rows.shape[0], num_kv_heads, lib.num_chunks, q_rows.device)
    else:
        from moska.kernels.router import route

        sel = route(q_rows, lib.routing[layer], group.top_k, scorer=group.scorer)
    o_sel, lse_sel = ops.grouped_shared(q_rows, k_pool, v_pool, lib.chunk_offsets, sel, sm_scale)
    return o_sel, lse_sel, sel
