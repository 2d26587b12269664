"""KV-parallel attention for long requests: one request's unique KV is sharded by blocks
over P ranks (DistAttention, Infinite-LLM), each rank attends its shard, and the partial
states are merged by LSE — exact, since attention over disjoint key sets merges exactly.

Two ways to bring the partials together:

- ``kv_parallel_attention``: all-gather of (o, lse), every rank merges all P partials and
  holds the whole output (P x the state in bytes received per rank);
- ``helix_attention`` (Helix): an all-to-all by query heads, so rank j receives head slice
  j of every partial and merges only that — the tensor-parallel layout that a row-parallel
  o-projection and the FFN expect (one P-th of the bytes per rank). With ``microbatches``
  > 1 the all-to-all of one slice of rows runs (async) while the next slice is attended
  (HOP-B: communication overlapped across the batch).

Any query row, decode or prefill, attends on each rank to the prefix of that rank's blocks
whose positions it may see: local blocks are kept in logical order, so the keys a query at
position p sees locally are the first ``visible`` local tokens, and each row is a decode
row of the paged kernel (``block_tables`` row = this rank's blocks of its request,
``seq_lens`` = visible). A rank holding none of a row's keys gives (0, -inf).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moska.kernel_ops import KernelOps


class KVBudgetError(ValueError):
    """The ranks' free blocks together cannot hold the request's KV."""


@dataclass(frozen=True)
class BlockPlacement:
    """``owners[i]``: the rank holding logical block i of one request's KV."""

    num_ranks: int
    owners: tuple[int, ...]

    def __post_init__(self) -> None:
        if not all(0 <= r < self.num_ranks for r in self.owners):
            raise ValueError(f"owners must be ranks in [0, {self.num_ranks}), got {self.owners}")

    def blocks_of(self, rank: int) -> tuple[int, ...]:
        """Logical block ids on ``rank``, ascending (the order of its local block table)."""
        return tuple(i for i, r in enumerate(self.owners) if r == rank)

    def owner_of(self, position: int, block_size: int) -> int:
        """The rank that stores (and writes) the KV of token ``position``."""
        return self.owners[position // block_size]


def place_blocks(
    num_blocks: int, free_blocks: Sequence[int], policy: str = "fill"
) -> BlockPlacement:
    """Blocks of one request over ranks with ``free_blocks[r]`` free blocks each.

    ``fill`` (DistAttention): the lowest rank first, spilling to the next one when its
    blocks run out — a request stays on one rank while it fits. ``round_robin`` (Helix):
    block i on rank i % P, skipping full ranks, so every rank attends about the same number
    of tokens. Both are prefix-stable: n + 1 blocks are placed as n blocks plus one, so a
    growing request keeps its blocks where they are. Raises KVBudgetError when the free
    blocks of all ranks are too few.
    """
    p = len(free_blocks)
    if p < 1 or num_blocks < 0:
        raise ValueError(f"need >= 1 rank and >= 0 blocks, got {p} ranks, {num_blocks} blocks")
    if num_blocks > sum(free_blocks):
        raise KVBudgetError(
            f"the request needs {num_blocks} KV blocks but its {p} ranks have "
            f"{sum(free_blocks)} free ({list(free_blocks)}); add KV-parallel ranks, free "
            "blocks or shorten the request"
        )
    left, owners = list(free_blocks), []
    if policy == "fill":
        r = 0
        for _ in range(num_blocks):
            while left[r] == 0:
                r += 1
            owners.append(r)
            left[r] -= 1
    elif policy == "round_robin":
        r = 0
        for _ in range(num_blocks):
            while left[r % p] == 0:
                r += 1
            owners.append(r % p)
            left[r % p] -= 1
            r += 1
    else:
        raise ValueError(f"policy must be 'fill' or 'round_robin', got {policy!r}")
    return BlockPlacement(p, tuple(owners))


def visible_lens(
    placement: BlockPlacement,
    rank: int,
    block_size: int,
    seq_len: int,
    positions: torch.Tensor,  # [T] int64, query positions (< seq_len)
) -> torch.Tensor:  # [T] int32
    """For each query, how many of ``rank``'s tokens of this request it sees (causal):
    local tokens are the rank's blocks in logical order, so this is a prefix length."""
    blocks = torch.tensor(placement.blocks_of(rank), dtype=torch.int64)  # [n]
    start = blocks * block_size
    length = (seq_len - start).clamp(0, block_size)  # [n] tokens in each local block
    seen = (positions.cpu()[:, None] + 1 - start[None, :]).clamp(min=0)  # [T, n]
    return torch.minimum(seen, length[None, :]).sum(1).to(torch.int32)


def merge_partials(
    o_parts: torch.Tensor,  # [P, ..., D]
    lse_parts: torch.Tensor,  # [P, ...] fp32
) -> tuple[torch.Tensor, torch.Tensor]:  # (o [..., D] o_parts.dtype, lse [...] fp32)
    """Exact LSE merge of P partial states of the same rows; empty partials are (0, -inf)
    and all-empty rows give (0, -inf)."""
    lse = torch.logsumexp(lse_parts, 0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lse_parts - safe)  # [P, ...]
    o = (w.unsqueeze(-1) * o_parts.float()).sum(0)
    return o.to(o_parts.dtype), lse


def _host(t: torch.Tensor, group) -> bool:
    """Gloo with CUDA tensors (several ranks on one GPU, a logic run) goes through the host."""
    return t.is_cuda and dist.get_backend(group) == "gloo"


def all_gather_states(
    o: torch.Tensor, lse: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (o [..., D], lse [...]) stacked in rank order: ([P, ..., D], [P, ...])."""
    p = dist.get_world_size(group)
    out = []
    for t in (o, lse):
        host = _host(t, group)
        buf = t.cpu().contiguous() if host else t.contiguous()
        parts = [torch.empty_like(buf) for _ in range(p)]
        dist.all_gather(parts, buf, group=group)
        out.append(torch.stack(parts).to(t.device))
    return out[0], out[1]


def local_partial(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] this rank's cache
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [T, max_local_blocks] int32, this rank's blocks per row
    visible: torch.Tensor,  # [T] int32, local tokens each row sees (0: none)
    sm_scale: float,
    ops: KernelOps,
) -> tuple[torch.Tensor, torch.Tensor]:  # (o [T, Hq, D], lse [T, Hq] fp32)
    """This rank's partial state: each row a decode row of the paged kernel."""
    return ops.paged_decode(q, k_cache, v_cache, block_tables, visible, sm_scale)


def kv_parallel_attention(
    q: torch.Tensor,  # [T, Hq, D], the same rows on every rank
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [T, max_local_blocks] int32
    visible: torch.Tensor,  # [T] int32
    sm_scale: float,
    ops: KernelOps,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (o [T, Hq, D], lse [T, Hq]) on every rank
    """DistAttention: local partial, all-gather, LSE merge; every rank gets the result."""
    o, lse = local_partial(q, k_cache, v_cache, block_tables, visible, sm_scale, ops)
    o_all, lse_all = all_gather_states(o, lse, group)
    return merge_partials(o_all, lse_all)


def helix_all_to_all(
    o: torch.Tensor,  # [T, Hq, D] this rank's partial over its KV shard, every head
    lse: torch.Tensor,  # [T, Hq] fp32
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
):
    """Helix re-layout: head slice j of every rank's partial goes to rank j.

    Returns (o_parts [P, T, Hq/P, D], lse_parts [P, T, Hq/P]) — this rank's head slice of
    every rank's partial, for ``merge_partials`` — or, with ``async_op``, (work handles,
    finish) where ``finish()`` waits and returns them.
    """
    p = dist.get_world_size(group)
    t, hq, d = o.shape
    if hq % p:
        raise ValueError(f"Helix needs the query heads ({hq}) divisible by the ranks ({p})")
    hs = hq // p
    sends = [
        o.view(t, p, hs, d).transpose(0, 1).contiguous(),  # [P, T, hs, D]
        lse.view(t, p, hs).transpose(0, 1).contiguous(),  # [P, T, hs]
    ]
    host = _host(o, group)
    if host:
        sends = [x.cpu() for x in sends]
    recvs = [torch.empty_like(x) for x in sends]
    works = [
        dist.all_to_all_single(r, s, group=group, async_op=async_op) for r, s in zip(recvs, sends)
    ]

    def finish():
        for w in works if async_op else ():
            w.wait()
        return tuple(r.to(o.device) for r in recvs)

    return (works, finish) if async_op else finish()


def helix_attention(
    q: torch.Tensor,  # [T, Hq, D], the same rows on every rank
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [T, max_local_blocks] int32
    visible: torch.Tensor,  # [T] int32
    sm_scale: float,
    ops: KernelOps,
    group: dist.ProcessGroup | None = None,
    microbatches: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:  # (o [T, Hq/P, D], lse [T, Hq/P]): head slice `rank`
    """Helix: KV-parallel attention, then an all-to-all into the tensor-parallel layout
    (rank j holds query heads j*Hq/P .. (j+1)*Hq/P of every row, merged over all shards).

    ``microbatches`` > 1 (HOP-B): rows are cut into that many slices; the all-to-all of a
    slice is in flight while the next slice's partial is computed. Same result.
    """
    t = q.shape[0]
    bounds = torch.linspace(0, t, max(1, min(microbatches, t)) + 1).round().long().tolist()
    pending = []
    for a, b in itertools.pairwise(bounds):
        o, lse = local_partial(
            q[a:b], k_cache, v_cache, block_tables[a:b], visible[a:b], sm_scale, ops
        )
        pending.append(helix_all_to_all(o, lse, group, async_op=True)[1])
    parts = [finish() for finish in pending]
    o_parts = torch.cat([x[0] for x in parts], dim=1)  # [P, T, hs, D]
    lse_parts = torch.cat([x[1] for x in parts], dim=1)
    return merge_partials(o_parts, lse_parts)
