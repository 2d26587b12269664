"""Unique (per-request) KV cache bookkeeping: block ids, reference counts, prefix reuse."""

from moska.cache.block_allocator import BlockAllocator, OutOfBlocks
from moska.cache.block_manager import BlockManager, cache_namespace
from moska.cache.prefix_cache import CachedBlock, PrefixCache, hash_block

__all__ = [
    "BlockAllocator",
    "BlockManager",
    "CachedBlock",
    "OutOfBlocks",
    "PrefixCache",
    "cache_namespace",
    "hash_block",
]
