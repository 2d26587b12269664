"""Representative keys: a routing index whose cost does not grow with every key (issue #17.3).

The default router (key-max per KV head) scores a chunk by the largest logit of any of its
keys on the rank-r routing index: 2 * B * Hq * S * r FLOPs per layer, about 4x the attention
on the k chunks it picks (8B dims, 256 chunks of 4K, top-8, r = 32). Here each chunk keeps
m representative low-rank keys per KV head (m << chunk length) and a chunk's score is the
max logit over its representatives: the same key-max kernel (``router_dense.py``) scores
them, since a [C * m, Hkv, r] block of representatives with offsets ``arange(C + 1) * m``
is just a routing index of C chunks of m keys. Cost: m / L of the default's FLOPs and reads.

Kinds (all from the library's own low-rank keys, no model change):
- ``norm``: the m keys of largest low-rank norm (a needle's key is often a loud key);
- ``page``: per page of ``L / m`` consecutive tokens, its largest-norm key (spreads the m
  over the chunk: a loud region cannot take them all);
- ``kmeans``: m centroids after a few Lloyd iterations, seeded with the ``norm`` keys
  (a centroid is a mean: it can blur a single decisive key).

A chunk shorter than m keeps all its keys (padded with copies of one of them: a copy
changes no max). Representatives are built once per (index, kind, m) and cached beside the
index (``representatives_for``), at library-build time where the bench asks
(``prepare_library``) or on first use otherwise; the library's files are unchanged.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from moska.kernels.router import RoutingIndex

KINDS = ("norm", "page", "kmeans")


@dataclass(frozen=True)
class RepSpec:
    """Which representatives: ``kind`` in KINDS, ``m`` per chunk and KV head."""

    kind: str = "page"
    m: int = 16
    iters: int = 4  # Lloyd iterations (kmeans only)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"representative kind must be one of {KINDS}, got {self.kind!r}")
        if self.m < 1 or self.iters < 0:
            raise ValueError(f"need m >= 1 and iters >= 0, got m={self.m}, iters={self.iters}")


def _padded(lowrank_keys: torch.Tensor, chunk_offsets: torch.Tensor):
    """Chunks as [C, Hkv, Lmax, r] fp32 (short chunks padded with copies of their first key)
    and the valid mask [C, Lmax]."""
    offs = chunk_offsets.long().to(lowrank_keys.device)
    starts, lens = offs[:-1], offs[1:] - offs[:-1]
    L = int(lens.max())
    pos = torch.arange(L, device=offs.device)
    valid = pos[None, :] < lens[:, None]  # [C, L]
    rows = torch.where(valid, starts[:, None] + pos[None, :], starts[:, None])
    x = lowrank_keys[rows].float()  # [C, L, Hkv, r]
    return x.permute(0, 2, 1, 3), valid


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [C, Hkv, L, r], idx [C, Hkv, m] -> [C, Hkv, m, r]."""
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))


@torch.no_grad()
def build_representatives(
    lowrank_keys: torch.Tensor,  # [S, Hkv, r]
    chunk_offsets: torch.Tensor,  # [C + 1]
    spec: RepSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (keys [C * m, Hkv, r] in lowrank_keys' dtype, offsets [C + 1] int32 = arange * m)."""
    x, valid = _padded(lowrank_keys, chunk_offsets)
    C, Hkv, L, r = x.shape
    m = min(spec.m, L)
    norm = x.norm(dim=-1).masked_fill(~valid[:, None, :], float("-inf"))  # [C, Hkv, L]
    if spec.kind == "page":
        page = -(-L // m)  # tokens per page
        pad = page * m - L
        padded = torch.nn.functional.pad(norm, (0, pad), value=float("-inf"))
        best = padded.view(C, Hkv, m, page).argmax(dim=-1)  # [C, Hkv, m]
        idx = (best + torch.arange(m, device=x.device) * page).clamp(max=L - 1)
        # a page wholly past a short chunk's end: repeat the first page's key (a copy)
        idx = torch.where(valid.gather(1, idx.flatten(1)).view_as(idx), idx, idx[..., :1])
        reps = _gather(x, idx)
    else:
        idx = norm.topk(m, dim=-1).indices  # [C, Hkv, m]; a short chunk: -inf -> its copies
        reps = _gather(x, idx)
        if spec.kind == "kmeans":
            reps = _lloyd(x, valid, reps, spec.iters)
    keys = reps.permute(0, 2, 1, 3).reshape(C * m, Hkv, r).to(lowrank_keys.dtype).contiguous()
    offsets = (torch.arange(C + 1, device=x.device) * m).to(torch.int32)
    return keys, offsets


def _lloyd(x: torch.Tensor, valid: torch.Tensor, cent: torch.Tensor, iters: int) -> torch.Tensor:
    """A few Lloyd iterations per (chunk, KV head): x [C, Hkv, L, r], cent [C, Hkv, m, r]."""
    w = valid[:, None, :, None].float()  # [C, 1, L, 1]
    m = cent.shape[2]
    for _ in range(iters):
        d = (cent * cent).sum(-1)[:, :, None, :] - 2 * x @ cent.transpose(-1, -2)  # [C,H,L,m]
        one = torch.nn.functional.one_hot(d.argmin(dim=-1), m).float() * w  # [C, H, L, m]
        count = one.sum(dim=2)[..., None]  # [C, H, m, 1]
        sums = one.transpose(-1, -2) @ x  # [C, H, m, r]
        cent = torch.where(count > 0, sums / count.clamp(min=1), cent)  # empty: keep
    return cent


_CACHE: dict[tuple[int, RepSpec], RoutingIndex] = {}


def representatives_for(index: RoutingIndex, spec: RepSpec) -> RoutingIndex:
    """``index`` with its keys replaced by the representatives (C chunks of m keys each):
    ``moska.kernels.router.route`` / ``score_chunks`` score it unchanged. Cached per
    (index, spec) for the index's lifetime."""
    key = (id(index.lowrank_keys), spec)
    hit = _CACHE.get(key)
    if hit is None:
        keys, offsets = build_representatives(index.lowrank_keys, index.chunk_offsets, spec)
        hit = index._replace(lowrank_keys=keys, chunk_offsets=offsets)
        _CACHE[key] = hit
        weakref.finalize(index.lowrank_keys, _CACHE.pop, key, None)
    return hit


def prepare_library(library, spec: RepSpec) -> None:
    """Build every layer's representatives now (after the library's build or load)."""
    for index in library.routing:
        representatives_for(index, spec)


def score_representatives_ref(q: torch.Tensor, index: RoutingIndex, spec: RepSpec):
    """Reference: per (row, KV head, chunk) the max over the group's query heads and the
    chunk's representatives of (q @ basis) . rep, in fp32 with plain loops: [B, Hkv, C]."""
    keys, offsets = build_representatives(index.lowrank_keys, index.chunk_offsets, spec)
    B, Hq, D = q.shape
    Hkv = index.basis.shape[0]
    qr = torch.einsum("bhgd,hdr->bhgr", q.float().view(B, Hkv, Hq // Hkv, D), index.basis.float())
    offs = offsets.tolist()
    out = torch.empty(B, Hkv, len(offs) - 1)
    for c in range(len(offs) - 1):
        for h in range(Hkv):
            logits = qr[:, h] @ keys[offs[c] : offs[c + 1], h].float().T  # [B, G, m]
            out[:, h, c] = logits.flatten(1).amax(dim=1)
    return out


def select_with_representatives(
    q: torch.Tensor,  # [B, Hq, D]
    library,  # LoadedLibrary
    layer: int,
    top_k: int,
    policy,  # RoutingPolicy: per_kv_head, always_first / always_last, dense_layers
    spec: RepSpec,
    *,
    use_triton: bool = True,
    keymax_programs: int | None = None,
):
    """The policy's fixed-k key-max rule, scored on the representatives: Selections."""
    from moska.routing.policy import always_chunks
    from moska.routing.select import all_chunks

    index: RoutingIndex = library.routing[layer]
    C = index.num_chunks
    if top_k >= C or layer < policy.dense_layers:
        return all_chunks(q.shape[0], index.num_kv_heads, C, q.device, use_triton)
    always = always_chunks(policy, C, getattr(library, "mode", "prefix"), top_k)
    return route_representatives(
        q, representatives_for(index, spec), top_k, policy.per_kv_head, always,
        keymax_programs=keymax_programs, use_triton=use_triton,
    )  # fmt: skip


def route_representatives(
    q: torch.Tensor,  # [B, Hq, D]
    reps: RoutingIndex,  # from representatives_for: C chunks of m keys
    top_k: int,
    per_kv_head: bool = True,
    always: list[int] | None = None,
    *,
    keymax_programs: int | None = None,
    use_triton: bool = True,
):
    """``moska.kernels.router.route``'s key-max rule on the representatives, with the key
    block of the kernel cut to m (a 64-key block would be mostly masked for m < 64)."""
    from moska.kernels.router_dense import keymax_dense_scores
    from moska.kernels.selections import from_topk

    C, Hkv = reps.num_chunks, reps.num_kv_heads
    m = int(reps.lowrank_keys.shape[0]) // C
    scores = keymax_dense_scores(
        q,
        reps.basis,
        reps.lowrank_keys,
        reps.chunk_offsets,
        block_n=min(64, max(16, 1 << (m - 1).bit_length())),
        max_programs=keymax_programs,
        use_triton=use_triton,
    )  # fmt: skip  [B, Hkv, C]
    if not per_kv_head:
        scores = scores.sum(dim=1, keepdim=True)
    if always:
        scores[..., always] = float("inf")
    return from_topk(scores.topk(top_k, dim=-1).indices, Hkv, C, use_triton)
