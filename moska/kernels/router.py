"""Chunk router: picks, per request, the top-k chunks of a shared library to attend to.

Scorers (score of request b, KV head h, chunk c = max over the G query heads of the group):

- ``mean``: ``q . mean_keys[c, h]``. Reads C summaries, nearly free, but the mean of a chunk's
  keys buries a single decisive key (a needle) among hundreds of ordinary ones.
- ``bound`` (Quest): ``sum_d max(q_d * key_min[c,h,d], q_d * key_max[c,h,d])``, an upper
  bound on every logit of the chunk. Also reads only C summaries; never underestimates a
  needle, but is loose in high dimension, so it ranks poorly on its own.
- ``keymax``: the largest single-key logit of the chunk on a low-rank copy of its keys,
  ``max_j (q @ basis[h]) . lowrank_keys[j, h]`` with an orthonormal per-head basis of rank r
  (PCA of that head's keys). It keeps a needle, because one key decides the score. Cost: it
  reads the low-rank copy of every key, r/D of K, i.e. about 1/8 of the library's KV at
  r = D/4; one grouped launch serves the whole batch, so the copy is read once per tile of
  requests, not once per request.
- ``two_stage``: the bound shortlists ``shortlist_factor * top_k`` chunks per request (it
  cannot drop a needle's chunk for underestimating it), then key-max ranks only the
  shortlist, in one grouped launch over (chunk, tile of requests that shortlisted it). Use it
  when top_k * shortlist_factor is well below C (large libraries, small k): key-max then
  reads only the shortlisted chunks. When the shortlist covers every chunk it equals keymax.

Unless ``per_kv_head``, scores are aggregated over KV heads by their SUM, so every KV head of
a request gets the same chunks. Sum rather than max: the sum is invariant to a per-head
constant shift of the logits (heads differ in logit scale and offset; key-max on a centred
PCA basis drops a per-head constant), whereas a max lets the head with the largest offset
decide alone.

``route`` returns ``Selections`` sorted by (chunk, kv_head, req), with their (req, kv_head)
order for the merge, without a host sync, a sort or a Python loop over requests.
"""

from typing import NamedTuple

import torch

from .router_dense import keymax_dense_scores
from .router_scores import keymax_pair_scores, summary_scores
from .router_topk import topk_rows
from .selections import Selections, from_topk

SCORERS = ("keymax", "mean", "bound", "two_stage")
# The final top-k: True ``router_topk.topk_rows`` (one launch), False ``torch.topk``. Read at
# call time, so the decode bench can time both. Session 17 on the H200 (the default's
# [B, 8, 256] score tables, `router_tiles_h200_session17.json`): 0.013 / 0.018 / 0.024 ms
# against torch.topk's 0.024 / 0.050 / 0.133 ms at B = 64 / 256 / 1,024, the same chunk sets
# in every row (ties included: both take the lower chunk; CUDA test on fp16-valued scores).
ROW_TOPK = True


class RoutingIndex(NamedTuple):
    """Routing index of ONE layer of a library, all on the key pool's device."""

    chunk_offsets: torch.Tensor  # [C + 1] int32; chunk c = key rows offsets[c]:offsets[c+1]
    mean_keys: torch.Tensor  # [C, Hkv, D] pool dtype
    key_min: torch.Tensor  # [C, Hkv, D] pool dtype, elementwise min over the chunk's keys
    key_max: torch.Tensor  # [C, Hkv, D] pool dtype, elementwise max
    basis: torch.Tensor  # [Hkv, D, r] pool dtype, orthonormal columns (top-r PCA per head)
    lowrank_keys: torch.Tensor  # [S_total, Hkv, r] keys @ basis[h]; fp16 (fp32 for fp32 pools)

    @property
    def num_chunks(self) -> int:
        return self.mean_keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.mean_keys.shape[1]

    @property
    def rank(self) -> int:
        return self.basis.shape[2]


@torch.no_grad()
def build_routing_index(
    k_pool: torch.Tensor,
    chunk_offsets: torch.Tensor,
    rank: int | None = None,
    *,
    block_rows: int = 1 << 16,
    max_fit_rows: int = 1 << 16,
    seed: int = 0,
) -> RoutingIndex:
    """Build the routing index of one layer from its key pool [S_total, Hkv, D].

    Runs on the pool's device in blocks of ``block_rows`` keys (fp32 accumulation), so
    millions of keys fit. The basis is the top-``rank`` principal directions (centred PCA)
    of each KV head's keys, fitted on at most ``max_fit_rows`` randomly sampled keys.
    ``rank`` defaults to D // 4. The low-rank keys are stored in fp16 for half-precision
    pools (bf16 too: fp16 keeps 3 more mantissa bits, and the key-max kernel can then
    accumulate logits in fp16 and take packed maxima), clamped to fp16's range.
    """
    if k_pool.dim() != 3:
        raise ValueError(f"k_pool must be [S_total, Hkv, D], got shape {tuple(k_pool.shape)}")
    S, Hkv, D = k_pool.shape
    rank = D // 4 if rank is None else rank
    if not 1 <= rank <= D:
        raise ValueError(f"rank must be in [1, D={D}], got {rank}")
    offs = chunk_offsets.detach().to("cpu", torch.int64)
    lens = offs[1:] - offs[:-1]
    if offs.dim() != 1 or offs.numel() < 2 or offs[0] != 0 or offs[-1] != S or (lens <= 0).any():
        raise ValueError(
            "chunk_offsets must be [C+1], start at 0, end at S_total = "
            f"{S} and strictly increase (no empty chunk); got {offs.tolist()[:8]}..."
        )
    dev, dtype = k_pool.device, k_pool.dtype
    offsets = offs.to(dev, torch.int32)
    C = lens.numel()

    # basis: centred PCA per KV head on a random subsample
    if S > max_fit_rows:
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randperm(S, generator=gen)[:max_fit_rows].to(dev)
        fit = k_pool[rows].float()
    else:
        fit = k_pool.float()
    fit = fit.transpose(0, 1)  # [Hkv, n, D]
    fit = fit - fit.mean(dim=1, keepdim=True)
    cov = torch.bmm(fit.transpose(1, 2), fit).double()  # [Hkv, D, D]
    del fit
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    basis = vecs[:, :, -rank:].flip(-1).to(dtype).contiguous()  # [Hkv, D, r]
    basis32 = basis.float()

    sums = torch.zeros(C, Hkv, D, dtype=torch.float32, device=dev)
    kmin = torch.full((C, Hkv, D), float("inf"), dtype=torch.float32, device=dev)
    kmax = torch.full((C, Hkv, D), float("-inf"), dtype=torch.float32, device=dev)
    lowrank = torch.empty(S, Hkv, rank, dtype=lowrank_dtype(dtype), device=dev)
    for r0 in range(0, S, block_rows):
        r1 = min(S, r0 + block_rows)
        blk = k_pool[r0:r1].float()  # [n, Hkv, D]
        row = torch.arange(r0, r1, device=dev, dtype=torch.int32)
        cid = torch.searchsorted(offsets[1:], row, right=True)  # chunk of each row
        sums.index_add_(0, cid, blk)
        idx = cid[:, None, None].expand_as(blk)
        kmin.scatter_reduce_(0, idx, blk, "amin")
        kmax.scatter_reduce_(0, idx, blk, "amax")
        lowrank[r0:r1] = to_lowrank_dtype(torch.einsum("nhd,hdr->nhr", blk, basis32), dtype)
    mean = sums / lens.to(dev, torch.float32)[:, None, None]
    return RoutingIndex(offsets, mean.to(dtype), kmin.to(dtype), kmax.to(dtype), basis, lowrank)


def lowrank_dtype(pool_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the low-rank keys for a pool dtype: fp32 stays fp32, half precision -> fp16."""
    return torch.float32 if pool_dtype == torch.float32 else torch.float16


def to_lowrank_dtype(x: torch.Tensor, pool_dtype: torch.dtype) -> torch.Tensor:
    """Cast low-rank keys (fp32, or an older library's bf16) to ``lowrank_dtype(pool_dtype)``,
    clamped to fp16's finite range. Keys already in that dtype are returned as they are
    (no copy when a library loads)."""
    dtype = lowrank_dtype(pool_dtype)
    if x.dtype == dtype:
        return x
    if dtype == torch.float16:
        x = x.float().clamp(-65504.0, 65504.0)
    return x.to(dtype)


def _keymax_pairs(
    q: torch.Tensor,
    index: RoutingIndex,
    pair_req: torch.Tensor,
    pair_chunk: torch.Tensor,
    max_programs: int | None = None,
    use_triton: bool = True,
    out: torch.Tensor | None = None,
    pair_head: torch.Tensor | None = None,
) -> torch.Tensor:
    # Tile shape from the key-max sweep (docs/performance-notes.md; H200, fp16 low-rank keys,
    # shortlist 32 of 256 chunks of 4096, CUDA-graph timing): 32-pair tiles over 64-key
    # blocks with 5 stages were the fastest or tied at both 32 pairs per chunk (B = 256,
    # 0.31 ms) and 128 (B = 1024, 0.62 ms; 16-pair tiles 0.88 ms).
    return keymax_pair_scores(
        q,
        index.basis,
        index.lowrank_keys,
        index.chunk_offsets,
        pair_req,
        pair_chunk,
        block_b=32,
        block_n=64,
        num_stages=5,
        max_programs=max_programs,
        use_triton=use_triton,
        out=out,
        project_first=True,  # queries projected once per layer, not in every tile
        pair_head=pair_head,
    )  # [P, Hkv] ([P] with pair_head), or ``out`` [B, Hkv, C] filled in


def score_chunks(
    q: torch.Tensor,
    index: RoutingIndex,
    scorer: str = "keymax",
    keymax_programs: int | None = None,
    use_triton: bool = True,
) -> torch.Tensor:
    """Scores of every chunk for every request and KV head: q [B, Hq, D] -> [B, Hkv, C] fp32.

    ``scorer`` is "keymax", "mean" or "bound" (two_stage needs top_k: use ``route``).
    ``use_triton`` False: the PyTorch references (an engine with attention "torch").
    """
    if scorer == "mean":
        return summary_scores(q, index.mean_keys, use_triton=use_triton)
    if scorer == "bound":
        return summary_scores(q, index.key_max, index.key_min, use_triton=use_triton)
    if scorer == "keymax":  # every pair: one launch, no work list (router_dense.py)
        return keymax_dense_scores(
            q,
            index.basis,
            index.lowrank_keys,
            index.chunk_offsets,
            max_programs=keymax_programs,
            use_triton=use_triton,
        )
    raise ValueError(f"score_chunks: scorer must be 'keymax', 'mean' or 'bound', got {scorer!r}")


def _two_stage_scores(
    q: torch.Tensor,
    index: RoutingIndex,
    top_k: int,
    shortlist_factor: int,
    always: torch.Tensor | None,
    keymax_programs: int | None,
    use_triton: bool = True,
    per_head: bool = False,
) -> torch.Tensor:
    """Key-max scores on a bound shortlist, -inf elsewhere: [B, Hkv, C] fp32. The shortlist
    is per request (the bound summed over KV heads; key-max then scores every head of a
    shortlisted chunk) or, ``per_head``, per (request, KV head) on that head's own bound,
    each shortlisted (request, head, chunk) scored for its head only."""
    B, C, Hkv = q.shape[0], index.num_chunks, index.num_kv_heads
    cheap = score_chunks(q, index, "bound", use_triton=use_triton)  # [B, Hkv, C]
    if not per_head:
        cheap = cheap.sum(dim=1, keepdim=True)  # [B, 1, C]
    if always is not None:
        cheap = cheap.masked_fill(always[:, None, :], float("inf"))
    n_short = min(C, shortlist_factor * top_k)
    short = cheap.topk(n_short, dim=-1).indices  # [B, Hr, n_short] int64
    pairs = from_topk(short, short.shape[1], C, use_triton)  # sorted by (chunk, head, req)
    # the kernel writes each pair's scores into the table itself (no scatter, no permute)
    table = torch.full((B, Hkv, C), float("-inf"), dtype=torch.float32, device=q.device)
    head = pairs.kv_head if per_head else None
    return _keymax_pairs(q, index, pairs.req, pairs.chunk, keymax_programs, use_triton, table, head)


def _always_mask(always, B: int, C: int, top_k: int, device: torch.device) -> torch.Tensor | None:
    if always is None:
        return None
    if isinstance(always, torch.Tensor):
        if always.dtype != torch.bool or tuple(always.shape) != (B, C):
            raise ValueError(
                f"always must be a [B={B}, C={C}] bool tensor or a list of chunk "
                f"ids, got {always.dtype} {tuple(always.shape)}"
            )
        return always.to(device)
    ids = sorted({int(c) for c in always})
    if ids and not (0 <= ids[0] and ids[-1] < C):
        raise ValueError(f"always: chunk ids must be in [0, {C}), got {ids}")
    if len(ids) > top_k:
        raise ValueError(
            f"always lists {len(ids)} chunks but top_k is {top_k}; they count "
            "toward top_k, so raise top_k or shorten the list"
        )
    mask = torch.zeros(C, dtype=torch.bool, device=device)
    mask[ids] = True
    return mask.expand(B, C)


def route(
    q: torch.Tensor,
    index: RoutingIndex,
    top_k: int,
    scorer: str = "keymax",
    per_kv_head: bool = False,
    always=None,
    shortlist_factor: int = 4,
    keymax_programs: int | None = None,
    use_triton: bool = True,
    shortlist_per_head: bool = False,
) -> Selections:
    """Top-k chunks per request (or per request and KV head) for q [B, Hq, D].

    ``shortlist_per_head`` (two_stage only): each KV head shortlists on its own bound.

    ``always``: [B, C] bool tensor or a list of chunk ids (for every request) of chunks that
    are always selected; they count toward top_k (a tensor row with more than top_k of them
    keeps an arbitrary top_k). ``top_k >= C`` selects every chunk without scoring.
    ``keymax_programs`` caps the key-max launch's grid (see keymax_pair_scores).
    ``use_triton`` False scores with the PyTorch references even where a kernel could run.
    Returns Selections sorted by (chunk, kv_head, req), int32, on q's device.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    if top_k < 0 or shortlist_factor < 1:
        raise ValueError(
            f"need top_k >= 0 and shortlist_factor >= 1, got {top_k}, {shortlist_factor}"
        )
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    B, C, Hkv, dev = q.shape[0], index.num_chunks, index.num_kv_heads, q.device
    always_mask = _always_mask(always, B, C, top_k, dev)
    if top_k >= C:
        return from_topk(torch.arange(C, device=dev).expand(B, 1, C), Hkv, C, use_triton)
    if scorer == "two_stage":
        scores = _two_stage_scores(
            q, index, top_k, shortlist_factor, always_mask, keymax_programs, use_triton,
            per_head=shortlist_per_head,
        )  # fmt: skip
    else:
        scores = score_chunks(q, index, scorer, keymax_programs, use_triton)  # [B, Hkv, C]
    if not per_kv_head:
        scores = scores.sum(dim=1, keepdim=True)  # [B, 1, C]
    if always_mask is not None:
        scores = scores.masked_fill(always_mask[:, None, :], float("inf"))
    if ROW_TOPK:
        chosen = topk_rows(scores, top_k, use_triton)  # [B, Hr, K]
    else:
        chosen = scores.topk(top_k, dim=-1).indices
    return from_topk(chosen, Hkv, C, use_triton)


def selections_to_lists(sel: Selections, B: int, num_kv_heads: int | None = None) -> list:
    """Per-request sorted chunk lists (union over KV heads), for debugging and reports.

    With ``num_kv_heads``: ``lists[b][h]`` is the sorted chunk list of request b, KV head h.
    """
    req, head, chunk = sel.req.tolist(), sel.kv_head.tolist(), sel.chunk.tolist()
    if num_kv_heads is None:
        sets: list[set[int]] = [set() for _ in range(B)]
        for b, c in zip(req, chunk):
            sets[b].add(c)
        return [sorted(s) for s in sets]
    lists: list[list[list[int]]] = [[[] for _ in range(num_kv_heads)] for _ in range(B)]
    for b, h, c in zip(req, head, chunk):
        lists[b][h].append(c)
    return [[sorted(x) for x in per_b] for per_b in lists]
