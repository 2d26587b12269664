"""Reference-counted pool of KV cache block ids (plain Python, no torch).

Every block is in exactly one of three states:
- free: ref count 0, holds nothing worth keeping; handed out first.
- used: ref count > 0; one count per request whose block table holds it (a block shared
  through the prefix cache has ref count > 1).
- cached: ref count 0 but its contents are registered in the prefix cache ("hashed"), so a
  later request may reuse it. Cached blocks form an LRU pool and are evicted, least recently
  released first, only when an allocation finds no free block. Eviction calls `on_evict`
  so the owner of the hash table can forget the block.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable


class OutOfBlocks(RuntimeError):
    """Raised when an allocation asks for more blocks than are free or evictable."""


class BlockAllocator:
    """Hands out block ids `0 .. num_blocks-1`; each block holds `block_size` token slots.

    Contract:
    - `allocate(n)` returns n distinct blocks with ref count 1, taking free blocks first and
      then evicting cached ones (LRU); it raises `OutOfBlocks` and changes nothing when
      `n > num_available`.
    - `incref` on a cached block revives it (ref count 1, out of the LRU pool).
    - `decref` to 0 sends a hashed block to the cached pool, any other block to the free list.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        on_evict: Callable[[int], None] | None = None,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._on_evict = on_evict
        self._ref_counts = [0] * num_blocks
        self._hashed = [False] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # oldest release first
        self._num_used = 0

    # --- counts -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks holding nothing (not counting evictable cached blocks)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks with ref count 0 kept for prefix reuse (evictable)."""
        return len(self._cached)

    @property
    def num_used(self) -> int:
        """Blocks with ref count > 0."""
        return self._num_used

    @property
    def num_available(self) -> int:
        """Blocks an allocation can get: free plus evictable cached."""
        return len(self._free) + len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def is_hashed(self, block_id: int) -> bool:
        return self._hashed[block_id]

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._cached

    def cached_lru_order(self) -> list[int]:
        """Cached block ids, the next to be evicted first."""
        return list(self._cached)

    # --- operations ---------------------------------------------------------------------
    def allocate(self, num: int) -> list[int]:
        if num < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num})")
        if num > self.num_available:
            raise OutOfBlocks(
                f"asked for {num} blocks but only {self.num_available} of {self.num_blocks} "
                f"are free or evictable"
            )
        out = []
        for _ in range(num):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._cached.popitem(last=False)
                self._hashed[block_id] = False
                if self._on_evict is not None:
                    self._on_evict(block_id)
            assert self._ref_counts[block_id] == 0
            self._ref_counts[block_id] = 1
            self._num_used += 1
            out.append(block_id)
        return out

    def incref(self, block_id: int) -> None:
        """Take one more reference: share a used block, or revive a cached one."""
        if self._ref_counts[block_id] == 0:
            if block_id not in self._cached:
                raise ValueError(f"block {block_id} is free; allocate it instead of incref")
            del self._cached[block_id]
            self._num_used += 1
        self._ref_counts[block_id] += 1

    def decref(self, block_id: int) -> None:
        """Drop one reference; at 0 the block becomes cached (if hashed) or free."""
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"block {block_id} is not in use (double free?)")
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            self._num_used -= 1
            if self._hashed[block_id]:
                self._cached[block_id] = None  # most recently released: evicted last
            else:
                self._free.append(block_id)

    def set_hashed(self, block_id: int, hashed: bool) -> None:
        """Mark whether the prefix cache holds this block's contents.

        Unhashing a cached block sends it to the free list. Hashing is only allowed on used
        blocks (a block is registered after its tokens were computed by a live request).
        """
        if hashed:
            if self._ref_counts[block_id] == 0:
                raise ValueError(f"only a used block can be hashed (block {block_id})")
            self._hashed[block_id] = True
            return
        self._hashed[block_id] = False
        if block_id in self._cached:
            del self._cached[block_id]
            self._free.append(block_id)

    # --- invariants ---------------------------------------------------------------------
    def check_integrity(self) -> None:
        """free + used + cached == total, no block in two states, counts consistent."""
        free = set(self._free)
        cached = set(self._cached)
        used = {b for b in range(self.num_blocks) if self._ref_counts[b] > 0}
        assert len(free) == len(self._free), "a block is twice in the free list"
        assert not free & cached, f"blocks both free and cached: {sorted(free & cached)}"
        assert not free & used, f"blocks both free and used: {sorted(free & used)}"
        assert not cached & used, f"blocks both cached and used: {sorted(cached & used)}"
        assert len(free) + len(cached) + len(used) == self.num_blocks, (
            len(free),
            len(cached),
            len(used),
            self.num_blocks,
        )
        assert len(used) == self._num_used, (len(used), self._num_used)
        assert all(rc >= 0 for rc in self._ref_counts)
        assert all(self._hashed[b] for b in cached), "a cached block is not hashed"
        assert not any(self._hashed[b] for b in free), "a free block is still hashed"
