"""Chunk scorers that no RoutingPolicy field expresses, for the code-model study
(``moska bench fidelity --study``): where does the default's key-max lose to the oracle?

The default scores a (row, KV head, chunk) by the largest logit of any of the group's G query
heads on any key of the chunk, on a rank-r copy of the keys (r = head_dim / 4). The oracle
ranks by the chunk's true attention mass summed over the G query heads. Two differences are
tested apart, each a pure-PyTorch scorer swapped in for policies registered here:

- ``keys``: ``lowrank`` (the library's routing index, as the default) or ``full`` (the exact
  keys of the pool: key-max at full rank);
- ``heads``: ``max`` over the G query heads (the default) or ``lse``, the log-sum-exp over them
  of each query head's own key-max logit (times sm_scale): an estimate of the summed mass in
  which every query head of the group counts, not only the loudest.

``default+lowrank_max`` recomputes the default in this code (a check of the harness: it must
give the default's figure). Selections are per KV head, fixed k, like the default.
"""

from __future__ import annotations

import functools

import torch

from moska.bench import fidelity_hook
from moska.kernels.selections import from_topk
from moska.routing import RoutingPolicy

VARIANTS = {  # name -> (keys, heads)
    "default+lowrank_max": ("lowrank", "max"),
    "default+full_max": ("full", "max"),
    "default+lowrank_lse": ("lowrank", "lse"),
    "default+full_lse": ("full", "lse"),
}


def head_scores(
    q: torch.Tensor,  # [B, Hq, D]
    keys: torch.Tensor,  # [S, Hkv, R] (full keys: R = D)
    basis: torch.Tensor | None,  # [Hkv, D, R] or None for full keys
    chunk_offsets: torch.Tensor,  # [C + 1]
    sm_scale: float,
    heads: str,
) -> torch.Tensor:  # [B, Hkv, C] fp32
    """Per (row, KV head, chunk): each query head's max logit over the chunk's keys, then
    the max (``heads="max"``) or log-sum-exp (``"lse"``) over the group's query heads."""
    B, Hq, D = q.shape
    Hkv = keys.shape[1]
    qg = q.float().view(B, Hkv, Hq // Hkv, D)
    if basis is not None:
        qg = torch.einsum("bhgd,hdr->bhgr", qg, basis.float())
    logits = torch.einsum("bhgr,shr->bhgs", qg, keys.float()) * sm_scale  # [B, Hkv, G, S]
    offs = chunk_offsets.long().to(q.device)
    C = offs.numel() - 1
    owner = torch.repeat_interleave(torch.arange(C, device=q.device), offs[1:] - offs[:-1])
    per_head = torch.full((*logits.shape[:3], C), float("-inf"), device=q.device)
    per_head = per_head.scatter_reduce(3, owner.expand_as(logits), logits, "amax")
    if heads == "max":
        return per_head.amax(dim=2)
    return torch.logsumexp(per_head, dim=2)


def _select(q, library, layer, top_k, policy, sm_scale, rule: tuple[str, str], **kw):
    """Policy `rule` = (keys, heads)'s selection: top-k of its scores per KV head."""
    C = library.num_chunks
    if top_k >= C:
        return fidelity_hook.next_select(q, library, layer, top_k, policy, sm_scale, **kw)
    keys_kind, heads = rule
    index = library.routing[layer]
    if keys_kind == "full":
        keys, basis = library.k_pools[layer], None
    else:
        keys, basis = index.lowrank_keys, index.basis
    s = head_scores(q, keys, basis, index.chunk_offsets, sm_scale, heads)
    use_triton = kw.get("use_triton", True)
    return from_topk(s.topk(top_k, dim=-1).indices, index.num_kv_heads, C, use_triton)


def variant_policies() -> dict[str, RoutingPolicy]:
    """The study's scorer variants as named policies (fresh objects; `fidelity_hook`)."""
    return fidelity_hook.named_policies(
        {name: functools.partial(_select, rule=rule) for name, rule in VARIANTS.items()}
    )
