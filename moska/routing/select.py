"""Apply a RoutingPolicy to one layer of one library group: q rows -> Selections.

Fixed k without pages goes through ``moska.kernels.router.route`` (top-k, no host sync,
CUDA-graph safe). Adaptive k and page scoring build a [B, Hr, C] mask of chosen chunks and
turn it into Selections with one ``nonzero`` (a host sync, eager steps only).
"""

from __future__ import annotations

import math

import torch

from moska.kernels.router import RoutingIndex, route, score_chunks
from moska.kernels.router_scores import keymax_pair_scores
from moska.kernels.selections import Selections, from_topk
from moska.routing.policy import ORACLE, RoutingPolicy, always_chunks


def all_chunks(
    num_rows: int, num_kv_heads: int, num_chunks: int, device, use_triton: bool = True
) -> Selections:
    """Every row reads every chunk with every KV head, sorted by (chunk, kv_head, req)."""
    every = torch.arange(num_chunks, device=device).expand(num_rows, 1, num_chunks)
    return from_topk(every, num_kv_heads, num_chunks, use_triton)


def from_mask(mask: torch.Tensor, num_kv_heads: int) -> Selections:
    """Selections from a [B, Hr, C] bool mask (Hr = 1 or Hkv), sorted by (chunk, kv_head,
    req); row_order is left None (the merge sorts). One host sync (``nonzero``)."""
    B, Hr, C = mask.shape
    full = mask.expand(B, num_kv_heads, C) if Hr == 1 else mask
    c, h, b = full.permute(2, 1, 0).nonzero(as_tuple=True)  # lexicographic (chunk, head, req)
    i32 = torch.int32
    return Selections(b.to(i32), h.to(i32), c.to(i32))


def select_chunks(
    q: torch.Tensor,  # [B, Hq, D]
    library,  # LoadedLibrary: routing, k_pools, chunk_offsets, num_chunks, mode
    layer: int,
    top_k: int,
    policy: RoutingPolicy,
    sm_scale: float,
    *,
    use_triton: bool = True,
    keymax_programs: int | None = None,
) -> Selections:
    """The chunks each row of ``q`` reads at ``layer`` under ``policy``."""
    C = library.num_chunks
    index: RoutingIndex = library.routing[layer]
    Hkv, B, dev = index.num_kv_heads, q.shape[0], q.device
    if top_k >= C or layer < policy.dense_layers:
        return all_chunks(B, Hkv, C, dev, use_triton)
    split = getattr(library, "head_split", None)  # tensor parallelism (distributed/tp_library)
    if split is not None and split.needs_exchange(policy):  # routes over every rank's heads
        return split.select(q, library, layer, top_k, policy, sm_scale, use_triton=use_triton,
                            keymax_programs=keymax_programs)  # fmt: skip
    always = always_chunks(policy, C, getattr(library, "mode", "prefix"), top_k)
    fixed = policy.mass_threshold is None and policy.page_size is None
    if fixed and policy.scorer != ORACLE:
        return route(
            q,
            index,
            top_k,
            scorer=policy.scorer,
            per_kv_head=policy.per_kv_head,
            always=always or None,
            shortlist_factor=policy.shortlist_factor,
            keymax_programs=keymax_programs,
            use_triton=use_triton,
            shortlist_per_head=policy.shortlist_per_head,
        )
    logmass = log_mass(q, library, layer, top_k, policy, sm_scale, use_triton)  # [B, Hkv, C]
    mask = choose(logmass, top_k, always, policy.per_kv_head, policy.mass_threshold)
    return from_mask(mask, Hkv)


def choose(
    logmass: torch.Tensor,  # [B, Hkv, C] estimated log attention mass per chunk and KV head
    top_k: int,
    always: list[int],
    per_kv_head: bool,
    mass_threshold: float | None,
) -> torch.Tensor:  # [B, Hr, C] bool
    """Chunks by estimated mass, best first: the always-read ones, then until the estimated
    share reaches ``mass_threshold`` (None: exactly top_k), never more than top_k.

    Across KV heads (not ``per_kv_head``) a chunk's share is the mean over heads of its
    per-head share (softmax of the log-mass over chunks) and rows rank chunks by that."""
    C = logmass.shape[2]
    share = torch.softmax(logmass.float(), dim=-1).nan_to_num(0.0)  # [B, Hkv, C]
    if not per_kv_head:
        share = share.mean(dim=1, keepdim=True)  # [B, 1, C]
    rank_key = share.clone()
    if always:
        rank_key[..., always] = float("inf")
    order = rank_key.argsort(dim=-1, descending=True)  # [B, Hr, C]
    if mass_threshold is None:
        take = torch.full(share.shape[:2], top_k, device=share.device)
    else:
        cum = share.gather(-1, order).cumsum(dim=-1)  # share of the best n+1 chunks
        need = (cum < mass_threshold).sum(dim=-1) + 1  # chunks until the threshold
        take = need.clamp(min=max(1, len(always)), max=top_k)
    ranks = torch.arange(C, device=share.device)
    chosen_sorted = ranks[None, None, :] < take[..., None]  # [B, Hr, C] by rank
    mask = torch.zeros_like(chosen_sorted)
    return mask.scatter(-1, order, chosen_sorted)


def log_mass(
    q: torch.Tensor,
    library,
    layer: int,
    top_k: int,
    policy: RoutingPolicy,
    sm_scale: float,
    use_triton: bool = True,
) -> torch.Tensor:  # [B, Hkv, C] fp32
    """Estimated log attention mass of each chunk (up to a per-row constant): the scorer's
    logit times sm_scale; the mean scorer adds log(chunk length) (every key counted at the
    mean); pages give the log-sum-exp of their key-max logits; the oracle is exact."""
    index: RoutingIndex = library.routing[layer]
    if policy.scorer == ORACLE:
        return oracle_log_mass(q, library.k_pools[layer], index.chunk_offsets, sm_scale)
    if policy.page_size is not None:
        return page_log_mass(q, index, policy.page_size, sm_scale, use_triton)
    if policy.scorer == "two_stage":
        from moska.kernels.router import _two_stage_scores

        s = _two_stage_scores(
            q, index, top_k, policy.shortlist_factor, None, None, use_triton,
            per_head=policy.shortlist_per_head,
        )  # fmt: skip
    else:
        s = score_chunks(q, index, policy.scorer, use_triton=use_triton)
    s = s * sm_scale
    if policy.scorer == "mean":
        lens = (index.chunk_offsets[1:] - index.chunk_offsets[:-1]).float()
        s = s + lens.log()
    return s


def page_offsets(chunk_offsets: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages of at most ``page_size`` keys inside each chunk: (offsets [P+1] int32, chunk of
    each page [P] int64), on the chunk offsets' device."""
    offs = chunk_offsets.tolist()
    starts, owner = [], []
    for c in range(len(offs) - 1):
        for s in range(offs[c], offs[c + 1], page_size):
            starts.append(s)
            owner.append(c)
    dev = chunk_offsets.device
    pages = torch.tensor([*starts, offs[-1]], dtype=torch.int32, device=dev)
    return pages, torch.tensor(owner, dtype=torch.int64, device=dev)


def page_log_mass(
    q: torch.Tensor, index: RoutingIndex, page_size: int, sm_scale: float, use_triton: bool
) -> torch.Tensor:  # [B, Hkv, C]
    """log sum over a chunk's pages of exp(sm_scale * page key-max logit)."""
    B, Hkv, C = q.shape[0], index.num_kv_heads, index.num_chunks
    pages, owner = page_offsets(index.chunk_offsets, page_size)
    P = owner.numel()
    pair_chunk = torch.arange(P, dtype=torch.int32, device=q.device).repeat_interleave(B)
    pair_req = torch.arange(B, dtype=torch.int32, device=q.device).repeat(P)
    s = keymax_pair_scores(
        q, index.basis, index.lowrank_keys, pages, pair_req, pair_chunk, use_triton=use_triton
    )  # [P * B, Hkv]
    s = s.view(P, B, Hkv).permute(1, 2, 0) * sm_scale  # [B, Hkv, P]
    peak = s.amax(dim=-1, keepdim=True)
    summed = torch.zeros(B, Hkv, C, dtype=torch.float32, device=q.device)
    summed.index_add_(2, owner, torch.exp(s - peak))
    return summed.log() + peak


def oracle_log_mass(
    q: torch.Tensor,  # [B, Hq, D]
    k_pool: torch.Tensor,  # [S, Hkv, D]
    chunk_offsets: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:  # [B, Hkv, C]
    """Exact log attention mass of each chunk, summed over each KV head's query heads."""
    B, Hq, D = q.shape
    Hkv = k_pool.shape[1]
    G = Hq // Hkv
    logits = torch.einsum("bhgd,shd->bhgs", q.float().view(B, Hkv, G, D), k_pool.float())
    logits = logits * sm_scale  # [B, Hkv, G, S]
    offs = chunk_offsets.long()
    owner = torch.repeat_interleave(
        torch.arange(offs.numel() - 1, device=q.device), offs[1:] - offs[:-1]
    )
    peak = logits.amax(dim=(2, 3), keepdim=True)
    summed = torch.zeros(B, Hkv, G, offs.numel() - 1, dtype=torch.float32, device=q.device)
    summed.index_add_(3, owner, torch.exp(logits - peak))
    return (summed.sum(dim=2).log() + peak[:, :, 0]).clamp(min=-math.inf)
