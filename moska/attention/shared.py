"""Shared-library attention for one group of rows: route to chunks, then one grouped
launch over every (chunk, KV head, tile of rows)."""

from __future__ import annotations

import torch

from moska.attention.metadata import LibraryGroup
from moska.kernel_ops import KernelOps
from moska.kernels.selections import Selections, from_topk


def all_chunk_selections(
    num_rows: int, num_kv_heads: int, num_chunks: int, device: torch.device, use_triton: bool
) -> Selections:
    """Every row reads every chunk with every KV head, sorted by (chunk, kv_head, req)."""
    every = torch.arange(num_chunks, device=device).expand(num_rows, 1, num_chunks)
    return from_topk(every, num_kv_heads, num_chunks, use_triton)


def route_group(
    ops: KernelOps,
    layer: int,
    q_rows: torch.Tensor,  # [n, Hq, D]
    group: LibraryGroup,
    sm_scale: float,
    keymax_programs: int | None = None,
) -> Selections:
    """The chunks each row of a group reads at ``layer`` (every chunk when top_k covers
    them all). Shared-KV ranks route here too: the routing index stays on rank 0."""
    lib = group.single()
    num_kv_heads = lib.k_pools[layer].shape[1]
    if group.top_k >= lib.num_chunks:
        n, dev = q_rows.shape[0], q_rows.device
        return all_chunk_selections(n, num_kv_heads, lib.num_chunks, dev, ops.triton_routing)
    from moska.routing import RoutingPolicy, select_chunks

    policy = group.policy or RoutingPolicy(scorer=group.scorer)
    return select_chunks(
        q_rows,
        lib,
        layer,
        group.top_k,
        policy,
        sm_scale,
        keymax_programs=keymax_programs,
        use_triton=ops.triton_routing,  # attention "torch": no Triton in routing either
    )


def shared_attention_for_group(
    ops: KernelOps,
    layer: int,
    q_rows: torch.Tensor,  # [n, Hq, D]
    group: LibraryGroup,
    sm_scale: float,
    keymax_programs: int | None = None,
):
    lib = group.single()
    k_pool, v_pool = lib.k_pools[layer], lib.v_pools[layer]  # [S, Hkv, D]
    span = one_chunk_span(ops, lib, group)
    if span is not None:  # every row reads every key: one chunk, the per-shape backend
        from moska.kernels.shared_one_chunk import one_chunk_states

        s, e = span
        return one_chunk_states(q_rows, k_pool[s:e], v_pool[s:e], sm_scale)
    sel = route_group(ops, layer, q_rows, group, sm_scale, keymax_programs)
    if getattr(lib, "tiers", None) is not None:  # KV in tiers: misses fetched, read by slot
        return lib.tiers.attend(ops, layer, q_rows, sel, sm_scale)  # sel less skipped chunks
    kw = fp8_kwargs(lib, layer)
    if ops.name == "triton" and getattr(lib, "fp8_mma", None) is not None:
        from moska.library.fp8_mma import mma_kwargs  # --fp8-attention mma: V token-major

        kw.update(mma_kwargs(lib, layer))
    o_sel, lse_sel = ops.grouped_shared(
        q_rows, k_pool, v_pool, lib.chunk_offsets, sel, sm_scale, **kw
    )
    return o_sel, lse_sel, sel


def one_chunk_span(ops: KernelOps, lib, group: LibraryGroup) -> tuple[int, int] | None:
    """The pool rows [start, end) of the library when every row of `group` reads all of
    it with the Triton kernels, else None: a library of one chunk (any top_k routes to it),
    or top_k covering every chunk of several (they are contiguous rows, so their attention is
    one over all of them, and the merge is exact either way; a step that records its routing
    reports every chunk: `reported_selections`). Then `kernels/shared_one_chunk.py` runs it as one chunk on the backend
    the tuning table measured fastest for the shape (our kernel, or cuDNN from 2,048 rows
    per KV head at some GQA ratios; H200), with no routing launch and one state per (row, KV
    head) for the merge instead of one per chunk. Tiered and FP8 libraries keep the grouped
    path (slot tables, scales); the PyTorch kernels ("torch") keep their reference."""
    if ops.name != "triton":
        return None
    if lib.num_chunks != 1 and group.top_k < lib.num_chunks:
        return None
    if getattr(lib, "tiers", None) is not None or getattr(lib, "kv_scale_pools", None):
        return None
    if getattr(lib, "fp8_mma", None) is not None:
        return None
    m = getattr(lib, "manifest", None)  # host ints, no device read
    chunks = getattr(m, "chunks", None)
    if m is None or chunks is None:  # not a loaded library's manifest: the grouped path
        return None
    return int(chunks[0].start), int(m.num_tokens)


def reported_selections(
    ops: KernelOps, layer: int, q_rows: torch.Tensor, group: LibraryGroup, sel: Selections
) -> Selections:
    """What a recording step reports as the group's routing at `layer`: `sel`, except where a
    library of several chunks was read whole as one span (`one_chunk_span`): then every chunk,
    as the routing would have chosen them."""
    lib = group.single()
    if lib.num_chunks == 1 or one_chunk_span(ops, lib, group) is None:
        return sel
    hkv = lib.k_pools[layer].shape[1]
    return all_chunk_selections(
        q_rows.shape[0], hkv, lib.num_chunks, q_rows.device, ops.triton_routing
    )


def fp8_kwargs(lib, layer: int) -> dict:
    """``kv_scales`` for the grouped kernel of an FP8 library's layer, with ``q_rotation``
    for a rotated one (library/fp8_rotated.py); nothing otherwise."""
    if not getattr(lib, "kv_scale_pools", None):
        return {}
    rot = getattr(lib, "q_rotation", None)
    kw = {"kv_scales": lib.kv_scales(layer)}
    return kw if rot is None else {**kw, "q_rotation": rot}


def routing_coverage(
    ops: KernelOps,
    layer: int,
    q_rows: torch.Tensor,  # [n, Hq, D]
    group: LibraryGroup,
    lse_sel: torch.Tensor,  # [N, G] float32, the routed chunks' LSE
    sel: Selections,
    sm_scale: float,
) -> torch.Tensor:  # [n] float32
    """Share of each row's shared-library attention mass that its routed chunks hold,
    averaged over query heads: sum over routed chunks of exp(lse_c) over the same sum over
    every chunk. Costs one all-chunks pass of this layer (debugging only)."""
    lib = group.single()
    n, num_kv_heads = q_rows.shape[0], lib.k_pools[layer].shape[1]
    every = all_chunk_selections(n, num_kv_heads, lib.num_chunks, q_rows.device, ops.triton_routing)
    if getattr(lib, "tiers", None) is not None:
        _, lse_all, _ = lib.tiers.attend(ops, layer, q_rows, every, sm_scale, wait=True)
    else:
        _, lse_all = ops.grouped_shared(
            q_rows,
            lib.k_pools[layer],
            lib.v_pools[layer],
            lib.chunk_offsets,
            every,
            sm_scale,
            **fp8_kwargs(lib, layer),
        )
    g = lse_all.shape[1]
    total = torch.logsumexp(lse_all.view(lib.num_chunks, num_kv_heads, n, g), dim=0)
    share = torch.exp(lse_sel - total[sel.kv_head.long(), sel.req.long()])  # [N, G]
    covered = torch.zeros(n, dtype=torch.float32, device=q_rows.device)
    covered.index_add_(0, sel.req.long(), share.sum(dim=1))
    return covered / (num_kv_heads * g)
