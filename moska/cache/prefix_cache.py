"""Hash table of full KV blocks for prefix reuse (plain Python, no torch).

A full block's hash chains over everything in front of it:
    hash_i = hash_fn(hash_{i-1}, tuple(tokens of block i), namespace)     (hash_{-1} = None)
The namespace carries what else the KV depends on: the request's shared library (its tokens
sit behind the library prefix) and its routing (`top_k_chunks`), so requests on different
libraries never share a block.

A hash only finds a candidate. A lookup then checks the candidate's token ids, namespace,
parent hash and the *identity* of its parent entry (a serial number never reused), so by
induction a match means the whole token prefix is equal: a hash collision, or a child entry
left behind after its parent was evicted and the hash reused, can never return wrong KV.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

HashFn = Callable[[int | None, tuple[int, ...], Hashable], int]


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...], namespace: Hashable) -> int:
    """Default chained block hash (Python's `hash`, stable within one process)."""
    return hash((parent_hash, token_ids, namespace))


@dataclass(frozen=True, slots=True)
class CachedBlock:
    """One registered full block: which block id holds the KV of which tokens."""

    block_id: int
    block_hash: int
    parent_hash: int | None
    parent_serial: int | None  # serial of the parent entry; None for a first block
    token_ids: tuple[int, ...]
    namespace: Hashable
    serial: int  # unique per registration, never reused

    def follows(self, parent: CachedBlock | None) -> bool:
        if parent is None:
            return self.parent_serial is None and self.parent_hash is None
        return self.parent_serial == parent.serial and self.parent_hash == parent.block_hash


class PrefixCache:
    """block hash -> CachedBlock, plus block id -> CachedBlock for eviction.

    Holds no reference counts; the block allocator owns block states and calls
    `remove_block` when it evicts a cached block.
    """

    def __init__(self, block_size: int, hash_fn: HashFn = hash_block) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self._hash_fn = hash_fn
        self._by_hash: dict[int, CachedBlock] = {}
        self._by_block: dict[int, CachedBlock] = {}
        self._serials = itertools.count()

    def __len__(self) -> int:
        return len(self._by_block)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._by_block

    def entry(self, block_id: int) -> CachedBlock | None:
        return self._by_block.get(block_id)

    def block_tokens(self, token_ids: Sequence[int], index: int) -> tuple[int, ...]:
        bs = self.block_size
        return tuple(token_ids[index * bs : (index + 1) * bs])

    def extend_hashes(
        self, hashes: list[int], token_ids: Sequence[int], namespace: Hashable
    ) -> list[int]:
        """Append to `hashes` the chained hashes of the full blocks of `token_ids` it lacks."""
        for i in range(len(hashes), len(token_ids) // self.block_size):
            parent = hashes[i - 1] if i > 0 else None
            hashes.append(self._hash_fn(parent, self.block_tokens(token_ids, i), namespace))
        return hashes

    def lookup(
        self,
        block_hash: int,
        parent: CachedBlock | None,
        token_ids: tuple[int, ...],
        namespace: Hashable,
    ) -> CachedBlock | None:
        """The entry for this exact block after `parent`, or None (also on a collision)."""
        found = self._by_hash.get(block_hash)
        if found is None or found.token_ids != token_ids or found.namespace != namespace:
            return None
        return found if found.follows(parent) else None

    def match(
        self,
        hashes: Sequence[int],
        token_ids: Sequence[int],
        namespace: Hashable,
        max_blocks: int,
    ) -> list[CachedBlock]:
        """Longest chain of cached entries for the first `max_blocks` full blocks."""
        chain: list[CachedBlock] = []
        for i in range(min(max_blocks, len(hashes))):
            parent = chain[-1] if chain else None
            found = self.lookup(hashes[i], parent, self.block_tokens(token_ids, i), namespace)
            if found is None:
                break
            chain.append(found)
        return chain

    def insert(
        self,
        block_id: int,
        block_hash: int,
        parent: CachedBlock | None,
        token_ids: tuple[int, ...],
        namespace: Hashable,
    ) -> CachedBlock | None:
        """Register `block_id`; returns None (and registers nothing) if the hash is taken."""
        assert len(token_ids) == self.block_size, (len(token_ids), self.block_size)
        assert block_id not in self._by_block, f"block {block_id} is already registered"
        if block_hash in self._by_hash:
            return None
        entry = CachedBlock(
            block_id=block_id,
            block_hash=block_hash,
            parent_hash=parent.block_hash if parent is not None else None,
            parent_serial=parent.serial if parent is not None else None,
            token_ids=token_ids,
            namespace=namespace,
            serial=next(self._serials),
        )
        self._by_hash[block_hash] = entry
        self._by_block[block_id] = entry
        return entry

    def remove_block(self, block_id: int) -> None:
        """Forget the entry held by `block_id` (called when the block is evicted)."""
        entry = self._by_block.pop(block_id)
        assert self._by_hash.get(entry.block_hash) is entry
        del self._by_hash[entry.block_hash]

    def block_ids(self) -> list[int]:
        return list(self._by_block)

    def check_integrity(self) -> None:
        assert len(self._by_hash) == len(self._by_block)
        for block_id, entry in self._by_block.items():
            assert entry.block_id == block_id
            assert self._by_hash.get(entry.block_hash) is entry
