"""Per-request KV block bookkeeping for the scheduler: block tables + prefix reuse.

Plain Python, no torch: this module only decides which block ids hold which tokens of
which request. The KV tensors themselves (`[num_blocks, block_size, Hkv, D]` per layer)
live with the model runner, which reads `block_table(request_id)`.

Lifecycle of one request (the scheduler drives it):
1. `n = match_prefix(req)` on admission: tokens whose KV is already cached, in full
   blocks, never the last token (its logits must be computed to sample).
2. `allocate_slots(req, num_new, num_cached_tokens=n)` takes those cached blocks (shared,
   ref count + 1), appends fresh blocks for the new tokens and sets
   `req.num_computed_tokens = n`; later steps call `allocate_slots(req, num_new)`.
3. After each step `cache_full_blocks(req)` registers the blocks that became full.
4. `free(req)` on finish, abort or preemption: full registered blocks with no other user
   stay reusable in the LRU cached pool until an allocation needs to evict them.

FlexiCache (moska/flexicache/engine_hook.py) hands a decoding request's old pages to host
memory: `release_blocks` frees the table's leading blocks (their entries become `HOLE`) and
`reserve_blocks` gives the request extra blocks for its per-head page pool; `free` releases
both and tells `free_listeners` (the host copy goes with it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from moska.cache.block_allocator import BlockAllocator
from moska.cache.prefix_cache import CachedBlock, HashFn, PrefixCache, hash_block


class CacheRequest(Protocol):
    """What the block manager reads of a request (an `engine.request.Request`)."""

    request_id: str
    num_computed_tokens: int

    @property
    def num_tokens(self) -> int: ...

    @property
    def all_token_ids(self) -> list[int]: ...

    @property
    def cache_namespace(self) -> Hashable: ...


def cache_namespace(request: CacheRequest) -> Hashable:
    """What a request's unique KV depends on besides its tokens: the shared library build
    in front of it and how many of its chunks are routed per step."""
    return request.cache_namespace


def _private(request: CacheRequest) -> bool:
    """A request whose KV no other may share (`Request.private_kv`: SemShareKV's approximate
    KV): never registered in the prefix cache; its lookups read exact KV only."""
    return getattr(request, "private_kv", False)


def _shared(request: CacheRequest) -> Mapping[int, int]:
    """Table index -> a block another holder keeps, which the request takes (ref count + 1)
    instead of a fresh block (`Request.shared_blocks`: SemShareKV's blocks of a reference
    whose KV it reuses unchanged, `moska/semshare/sharing.py`). Never the last block of an
    allocation: the step's last token (its KV computed fresh) lies there."""
    return getattr(request, "shared_blocks", None) or _NO_SHARED


def _lookup_namespace(request: CacheRequest) -> Hashable:
    """Where its lookups read: a private request's `exact_namespace` (other requests' exact
    blocks; its own are never registered), else its `cache_namespace`."""
    if _private(request):
        return request.exact_namespace  # type: ignore[attr-defined]
    return cache_namespace(request)


@dataclass
class _RequestState:
    hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks
    chain: list[CachedBlock] = field(default_factory=list)  # entries for blocks 0..len-1
    broken: bool = False  # a collision stopped registration for this request


class AllocationPlan(NamedTuple):
    """What ``allocate_slots`` would do for a request: the cached entries it takes (a prefix
    match, in chain order) and the fresh blocks it allocates after them."""

    cached: list[CachedBlock]
    fresh_blocks: int


class BlockManager:
    """Owns the block allocator, the prefix cache and every request's block table."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hash_fn: HashFn = hash_block,
    ) -> None:
        self.prefix_cache = PrefixCache(block_size, hash_fn)
        self.allocator = BlockAllocator(num_blocks, block_size, self.prefix_cache.remove_block)
        self.enable_prefix_caching = enable_prefix_caching
        self._states: dict[str, _RequestState] = {}
        self._holders: dict[str, CacheRequest] = {}  # requests whose block table is not empty
        self._tables: dict[str, list[int]] = {}  # request id -> its blocks, in order
        self._extra: dict[str, list[int]] = {}  # request id -> blocks it reserved (FlexiCache)
        self.free_listeners: list[Callable[[str], None]] = []  # told each freed request id
        # called with a block shortfall when an allocation does not fit, before it fails:
        # holders outside requests (SemShareKV's references) give blocks back
        self.reclaimers: list[Callable[[int], None]] = []

    def block_table(self, request_id: str) -> list[int]:
        """The blocks holding a request's KV, in token order (empty if it holds none). The
        list is the manager's own: read it, never change it."""
        return self._tables.get(request_id, _EMPTY)

    def holders(self) -> list[CacheRequest]:
        """Every request that holds blocks now (scheduler requests, and holders from outside
        the scheduler: a P/D transfer's or the KV pool's injected blocks, `pd/kv_blocks.py`)."""
        return list(self._holders.values())

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can get now: free plus evictable cached."""
        return self.allocator.num_available

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached blocks count as free)."""
        return self.allocator.num_used / self.allocator.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _state(self, request: CacheRequest) -> _RequestState:
        state = self._states.get(request.request_id)
        if state is None:
            state = self._states[request.request_id] = _RequestState()
        return state

    def _match(self, request: CacheRequest, max_blocks: int) -> list[CachedBlock]:
        if not self.enable_prefix_caching or max_blocks <= 0:
            return []
        tokens = request.all_token_ids
        namespace = _lookup_namespace(request)
        hashes = self.prefix_cache.extend_hashes(self._state(request).hashes, tokens, namespace)
        return self.prefix_cache.match(hashes, tokens, namespace, max_blocks)

    def match_prefix(self, request: CacheRequest) -> int:
        """Number of leading tokens of a request without blocks whose KV is cached.

        A multiple of block_size, at most `num_tokens - 1` rounded down. Changes nothing.
        """
        assert not self.block_table(request.request_id) and request.num_computed_tokens == 0, (
            request.request_id
        )
        return len(self._match(request, (request.num_tokens - 1) // self.block_size)) * (
            self.block_size
        )

    def _plan(
        self, request: CacheRequest, num_new_tokens: int, num_cached_tokens: int
    ) -> AllocationPlan | None:
        """The cached entries to take and fresh blocks to allocate, or None if they do not fit."""
        assert num_new_tokens >= 0 and num_cached_tokens >= 0
        chain: list[CachedBlock] = []
        if num_cached_tokens:
            assert not self.block_table(request.request_id)
            assert request.num_computed_tokens == 0
            assert num_cached_tokens % self.block_size == 0, num_cached_tokens
            chain = self._match(request, num_cached_tokens // self.block_size)
            assert len(chain) * self.block_size == num_cached_tokens, (
                "the prefix cache changed between match_prefix and allocate_slots"
            )
        total = request.num_computed_tokens + num_cached_tokens + num_new_tokens
        assert total <= request.num_tokens, (total, request.num_tokens)
        held = len(self.block_table(request.request_id))
        need = max(0, self.num_blocks_for(total) - held - len(chain))
        revived = sum(1 for e in chain if self.allocator.is_cached(e.block_id))
        first = held + len(chain)
        shared = _shared(request)
        need -= sum(1 for i in range(first, first + need - 1) if i in shared)
        if need > self.allocator.num_available - revived:
            return None
        return AllocationPlan(chain, need)

    def can_allocate(
        self, request: CacheRequest, num_new_tokens: int, num_cached_tokens: int = 0
    ) -> bool:
        return self._plan(request, num_new_tokens, num_cached_tokens) is not None

    def allocate_slots(
        self, request: CacheRequest, num_new_tokens: int, num_cached_tokens: int = 0
    ) -> bool:
        """Make room for tokens `[computed, computed + num_new_tokens)`; False changes nothing.

        With `num_cached_tokens` (the value `match_prefix` just returned for a request
        without blocks) the cached blocks are taken first and `request.num_computed_tokens`
        is set to it.
        """
        plan = self._plan(request, num_new_tokens, num_cached_tokens)
        for reclaim in self.reclaimers:  # blocks held outside requests, given back on demand
            if plan is not None:
                break
            short = self.num_blocks_for(request.num_tokens) - self.allocator.num_available
            reclaim(max(1, short))
            plan = self._plan(request, num_new_tokens, num_cached_tokens)
        if plan is None:
            return False
        chain, need = plan.cached, plan.fresh_blocks
        table = self._tables.setdefault(request.request_id, [])
        for entry in chain:
            self.allocator.incref(entry.block_id)
            table.append(entry.block_id)
        shared = _shared(request)
        fresh = iter(self.allocator.allocate(need))
        last = (
            self.num_blocks_for(request.num_computed_tokens + num_cached_tokens + num_new_tokens)
            - 1
        )
        for i in range(len(table), last + 1):
            if i < last and i in shared:
                self.allocator.incref(shared[i])
                table.append(shared[i])
            else:
                table.append(next(fresh))
        if chain:
            self._state(request).chain = list(chain)
            request.num_computed_tokens = num_cached_tokens
        if table:
            self._holders[request.request_id] = request
        else:
            del self._tables[request.request_id]
        return True

    def cache_full_blocks(self, request: CacheRequest) -> None:
        """Register the request's blocks that are full of computed tokens."""
        if not self.enable_prefix_caching or _private(request):
            return
        state = self._state(request)
        table = self.block_table(request.request_id)
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        if state.broken or num_full <= len(state.chain):
            return
        # only computed tokens: a token in flight (async scheduling) is not in all_token_ids
        tokens = request.all_token_ids[: num_full * self.block_size]
        namespace = cache_namespace(request)
        hashes = self.prefix_cache.extend_hashes(state.hashes, tokens, namespace)
        for i in range(len(state.chain), num_full):
            if table[i] == HOLE:  # released (FlexiCache) before it was registered
                state.broken = True
                return
            parent = state.chain[-1] if state.chain else None
            block_tokens = self.prefix_cache.block_tokens(tokens, i)
            same = self.prefix_cache.lookup(hashes[i], parent, block_tokens, namespace)
            if same is not None:
                # Another request registered identical KV first; ours stays unhashed.
                assert same.block_id != table[i]
                state.chain.append(same)
                continue
            block_id = table[i]
            entry = self.prefix_cache.insert(block_id, hashes[i], parent, block_tokens, namespace)
            if entry is None:  # hash collision with a different block: stop the chain here
                state.broken = True
                return
            self.allocator.set_hashed(block_id, True)
            state.chain.append(entry)

    def free(self, request: CacheRequest) -> None:
        """Release all blocks of a request (finish, abort or preemption). Tail blocks are
        released first so they are evicted before the prefix they extend."""
        for block_id in reversed(self._tables.pop(request.request_id, ())):
            if block_id != HOLE:
                self.allocator.decref(block_id)
        for block_id in self._extra.pop(request.request_id, ()):
            self.allocator.decref(block_id)
        self._states.pop(request.request_id, None)
        self._holders.pop(request.request_id, None)
        for listener in self.free_listeners:
            listener(request.request_id)

    def release_blocks(self, request_id: str, upto: int) -> int:
        """Free the request's blocks at table positions < `upto` (their KV lives elsewhere
        now: FlexiCache's host copy and pool); the entries become HOLE. Returns how many
        blocks were released."""
        table = self._tables[request_id]
        state = self._states.get(request_id)
        if state is not None:  # its registered blocks may be evicted now: chain no further
            state.broken = True
        n = 0
        for i in range(min(upto, len(table))):
            if table[i] != HOLE:
                self.allocator.decref(table[i])
                table[i] = HOLE
                n += 1
        return n

    def reserve_blocks(self, request_id: str, n: int) -> list[int] | None:
        """`n` more blocks held by a request that has blocks, outside its table (FlexiCache's
        page pool); None if fewer are available. `free` releases them."""
        assert request_id in self._tables, request_id
        if n > self.allocator.num_available:
            return None
        blocks = self.allocator.allocate(n)
        self._extra.setdefault(request_id, []).extend(blocks)
        return blocks

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix. (Not needed when a library is rebuilt: its new build
        has a new build id, hence a new namespace.)"""
        for block_id in self.prefix_cache.block_ids():
            self.prefix_cache.remove_block(block_id)
            self.allocator.set_hashed(block_id, False)
        for state in self._states.values():
            state.chain.clear()
            state.broken = True

    def check_integrity(self) -> None:
        """Allocator states, hash table and every holder's block table agree."""
        self.allocator.check_integrity()
        self.prefix_cache.check_integrity()
        hashed = {b for b in range(self.num_blocks) if self.allocator.is_hashed(b)}
        assert hashed == set(self.prefix_cache.block_ids()), "hashed flags != hash table"
        refs: Counter[int] = Counter()
        assert set(self._tables) == set(self._holders), "block tables without a holder"
        assert set(self._extra) <= set(self._tables), "reserved blocks without a table"
        for request in self._holders.values():
            table = self._tables[request.request_id]
            held = [b for b in table if b != HOLE] + self._extra.get(request.request_id, [])
            assert len(set(held)) == len(held), f"{request.request_id} holds a block twice"
            assert len(table) >= self.num_blocks_for(request.num_computed_tokens)
            refs.update(held)
        for block_id in range(self.num_blocks):
            assert self.allocator.ref_count(block_id) == refs[block_id], (
                block_id,
                self.allocator.ref_count(block_id),
                refs[block_id],
            )


_EMPTY: list[int] = []
_NO_SHARED: dict[int, int] = {}
HOLE = -1  # a table entry whose block was released (FlexiCache: the KV is on the host)
