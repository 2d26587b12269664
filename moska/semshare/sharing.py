"""Block-backed references and shared blocks: the KV memory SemShareKV saves per request.

Why: reused KV used to be copied into the request's own blocks, so a request held as much
KV as without reuse, and every reference was a second copy of its prompt's KV outside the
paged pool. Now a reference *is* blocks of the paged cache: `hold` takes the prompt's full
blocks from the request that computed it (ref count + 1, no copy; its decode appends after
them) and copies only the last one (the tail, where that request keeps writing). A
request whose plan reuses the reference then takes, instead of fresh blocks, every
reference block whose KV it would have copied unchanged (`shared_map`), so it holds only
its other blocks.

Which blocks are shared (the exactness argument). With the first `recompute_layers` = 1,
a reused token's KV is: layer 0 computed fresh, every later layer the reference's,
re-rotated by the position difference. Layer 0's KV depends on the token and its position
alone, so for a token equal to the reference's at the same position (shift 0) it *is*
the reference's, and re-rotating by 0 changes nothing: the whole block equals the
reference's block when each of its tokens is such a token and none is recomputed past
the first layer. The blend then writes nothing there (`blend_prefill`'s `shared`). The
tokens of every block it could share (`ReusePlan.fixed`; taken or not, sharing on or off)
are never kept past the boundary (not in the deviation ranking nor, on CUDA, the padding to
a row bucket; their layer-0 deviation is zero up to rounding, so they ranked last anyway):
sharing and copying keep the same rows, and what differs is only that a shared token's
layer-0 KV is the reference's instead of recomputed (equal up to rounding). Never shared:
the block of the prompt's last token and the last block of any allocation (the block
manager's rule: a step's last token is computed by the forward, which writes its KV;
decode appends after it), so no shared block is ever written and no copy-on-write is
needed. With `recompute_layers` > 1 layer 1's KV depends on the context: nothing shared.
Only tokens at their own positions: a shifted token's keys are re-rotated, so its block
is not the reference's (renames to names of another length, rewordings and reorders shift
everything after their first edit: README "SemShareKV", `bench/semshare_kv_memory.py`).

Lifetimes (ref counts): the block manager counts the reference's holder (`RefHolder`) and
each request that took a block; a reference evicted from the store frees only its
holder's counts, so blocks a request still holds stay. While a request's prompt is being
blended it pins its reference (`RefBlocks.pins`: taken at its first allocation, dropped
when its prompt is complete or its blocks are freed: finish, abort, preemption), so the
reference's unshared blocks, which the blend still copies from, stay too; an evicted
reference's holder is freed at its last unpin.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RefHolder:
    """A reference's blocks, as a `CacheRequest` of the block manager (never in the prefix
    cache: nothing registers it)."""

    request_id: str
    length: int
    shared_blocks: dict[int, int]  # the producing request's full blocks it takes
    num_computed_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.length

    @property
    def all_token_ids(self) -> list[int]:
        return []  # never looked up in the prefix cache

    @property
    def cache_namespace(self) -> Hashable:
        return ("semshare-reference", self.request_id)


@dataclass(eq=False)
class RefBlocks:
    """The blocks a reference holds and who needs them."""

    holder: RefHolder
    table: list[int]  # the holder's blocks, in token order
    block_bytes: int  # KV bytes of one block
    pins: int = 0  # requests blending from it now
    in_store: bool = True
    freed: bool = False

    @property
    def nbytes(self) -> int:
        return len(self.table) * self.block_bytes


def hold(block_manager, cache, table: list[int], n: int, name: str) -> RefBlocks | None:
    """Hold positions [0, n) of a request's blocks `table` as a reference: the blocks
    before the last shared (ref count + 1), the last copied into a fresh block (queued on
    the stream, like the forward before it). None when no block is free for it."""
    bs = block_manager.block_size
    last = -(-n // bs) - 1
    holder = RefHolder(name, n, {i: table[i] for i in range(last)})
    if not block_manager.allocate_slots(holder, n):
        return None
    held = list(block_manager.block_table(name))
    assert held[:last] == table[:last] and held[last] != table[last], (held, table[: last + 1])
    cache.k[:, held[last]] = cache.k[:, table[last]]
    cache.v[:, held[last]] = cache.v[:, table[last]]
    holder.num_computed_tokens = n
    per_block = 2 * cache.k[:, 0].numel() * cache.k.element_size()
    return RefBlocks(holder, held, per_block)


class BlockReferences:
    """One engine's block-backed references: held (`hold`), pinned by the requests blending
    from them (`pin`, `unpin`; the block manager tells `_on_free` of every freed request),
    freed when out of the store and unpinned (`on_evict`, the store's callback), evicted
    least recently used first when an allocation does not fit (`reclaim`, the block
    manager's callback, before it fails or preempts)."""

    def __init__(self, block_manager, cache, store) -> None:
        self.block_manager = block_manager
        self.cache = cache
        self.store = store
        self._pins: dict[str, Any] = {}  # request id -> its pinned ReusePlan
        self._names = itertools.count()
        block_manager.free_listeners.append(self._on_free)
        block_manager.reclaimers.append(self.reclaim)
        store.on_evict = self.on_evict

    def hold(self, table: list[int], n: int) -> RefBlocks | None:
        name = f"semshare-reference-{next(self._names)}"
        return hold(self.block_manager, self.cache, table, n, name)

    def pin(self, plan: Any, request: Any) -> dict[int, int] | None:
        """The blocks `request` takes from `plan`'s reference (None: none), its reference
        pinned until the prompt is computed or the request's blocks are freed. A reference
        freed before the request's first allocation: nothing to take (the prompt is then
        computed in full, `SemanticReuse.prefill`)."""
        blocks = plan.ref.blocks
        if blocks is None or request.num_computed_tokens >= request.num_prompt_tokens:
            return None
        if plan.pinned is None:
            if blocks.freed:
                return None
            blocks.pins += 1
            plan.pinned = request.request_id
            self._pins[request.request_id] = plan
        return plan.shared or None

    def unpin(self, plan: Any) -> None:
        if plan.pinned is None:
            return
        del self._pins[plan.pinned]
        plan.pinned = None
        blocks = plan.ref.blocks
        assert blocks is not None and blocks.pins > 0
        blocks.pins -= 1
        release(self.block_manager, blocks)

    def _on_free(self, request_id: str) -> None:
        plan = self._pins.get(request_id)
        if plan is not None:  # ended or preempted while its prompt was computed
            self.unpin(plan)

    def on_evict(self, ref: Any) -> None:
        if ref.blocks is not None:
            ref.blocks.in_store = False
            release(self.block_manager, ref.blocks)

    def reclaim(self, short: int) -> None:
        """Evict unpinned references, least recently used first, until `short` more blocks
        are free (blocks also held by requests are not freed by it) or none is left."""
        alloc = self.block_manager.allocator
        want = alloc.num_available + short
        for ref in self.store.lru_entries():
            if alloc.num_available >= want:
                return
            if ref.blocks is not None and ref.blocks.pins == 0:
                self.store.evict(ref.key)


def release(block_manager, blocks: RefBlocks) -> None:
    """Free the holder's counts once the reference is neither stored nor pinned."""
    if not blocks.freed and not blocks.in_store and blocks.pins == 0:
        blocks.freed = True
        block_manager.free(blocks.holder)


def shared_map(
    blocks: RefBlocks,
    ref_ids: torch.Tensor,  # [R] int64 (host): the reference's tokens
    ids: torch.Tensor,  # [N] int64 (host): the prompt's tokens
    ref_pos: torch.Tensor,  # [N] int64 (host): the plan's reference position or -1
    block_size: int,
) -> dict[int, int]:
    """Table index -> reference block, for the prompt's blocks whose every token equals the
    reference's at the same position (matched there: shift 0), before the block of the
    prompt's last token. See the module docstring for why their KV is the reference's."""
    n = ids.shape[0]
    nb = min((n - 1) // block_size, ref_ids.shape[0] // block_size, len(blocks.table))
    if nb <= 0:
        return {}
    m = nb * block_size
    pos = torch.arange(m)
    same = (ref_pos[:m] == pos) & (ids[:m] == ref_ids[:m])
    full = same.view(nb, block_size).all(dim=1).nonzero().squeeze(1).tolist()
    return {i: blocks.table[i] for i in full}


def positions(
    blocks: dict[int, int], start: int, end: int, bs: int, table: list[int] | None = None
) -> torch.Tensor | None:
    """[end - start] bool (host): positions of [start, end) in the blocks `blocks` names
    (with `table`: only those the request's table holds, i.e. took), or None if none. A few
    host ops whatever the block count (a slice assignment per block cost ~2 ms at 5K)."""
    lo, hi = start // bs, -(-end // bs)
    idx = [
        i for i, b in blocks.items()
        if lo <= i < hi and (table is None or (i < len(table) and table[i] == b))
    ]  # fmt: skip
    if not idx:
        return None
    per_block = torch.zeros(hi - lo, dtype=torch.bool)
    per_block[torch.tensor(idx) - lo] = True
    return per_block.repeat_interleave(bs)[start - lo * bs : end - lo * bs]
