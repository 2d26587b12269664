"""Reading a finished prefill's KV blocks out of an engine, and writing received ones into
another engine's cache as prefix-cache entries. Both run on the engine's thread.

Why the prefix cache: a decode instance that finds the prompt's full blocks cached takes
them at admission like any prefix hit (`BlockManager.match_prefix`), so the request itself
goes through the ordinary server path (chat template, library, sampling, stop strings)
unchanged and only the prompt's tail (fewer than `block_size` tokens, never the last
token's logits) is computed there. Blocks are written under the decode request's own
namespace (library build id, top_k_chunks), which equals the prefill's when both load the
same library store.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from moska.engine.request import Request


def usable_blocks(num_prompt_tokens: int, block_size: int) -> int:
    """Full prompt blocks a decode instance can take from its prefix cache (never the block
    of the last token: its logits must be computed to sample)."""
    return max(0, (num_prompt_tokens - 1) // block_size)


def snapshot(engine, request: Request) -> tuple[dict, list[torch.Tensor]]:
    """(meta, per-layer KV `[2, n, bs, Hkv, D]` on the host) of a finished request's usable
    prompt blocks."""
    bm, cache = engine.block_manager, engine.runner.cache
    prompt = list(request.prompt_token_ids)
    n = min(usable_blocks(len(prompt), bm.block_size), request.num_computed_tokens // bm.block_size)
    table = bm.block_table(request.request_id)[:n]
    ids = torch.tensor(table, dtype=torch.long, device=cache.k.device)
    layers = [
        torch.stack(
            [cache.k[layer].index_select(0, ids), cache.v[layer].index_select(0, ids)]
        ).cpu()
        for layer in range(cache.k.shape[0])
    ]  # [2, n, bs, Hkv, D] each
    return header(request, n, bm.block_size), layers


def header(request: Request, n_blocks: int, block_size: int) -> dict:
    """The transfer header of a request's first `n_blocks` prompt blocks: their tokens, the
    namespace they are cached under, and the prompt's counts (JSON-able)."""
    prompt = request.prompt_token_ids
    namespace = request.cache_namespace
    assert isinstance(namespace, tuple)  # a Request's is (build id, top_k[, ...]): JSON-able
    return {
        "tokens": list(prompt[: n_blocks * block_size]),
        "namespace": list(namespace),
        "block_size": block_size,
        "cached_tokens": int(request.num_cached_tokens),
        "prompt_tokens": len(prompt),
    }


@dataclass
class Holder:
    """Holds injected blocks (a `CacheRequest` for the block manager) until the request
    they were sent for has taken them."""

    request_id: str
    tokens: list[int]
    namespace: Hashable
    num_computed_tokens: int = 0
    hashes: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def all_token_ids(self) -> list[int]:
        return self.tokens

    @property
    def cache_namespace(self) -> Hashable:
        return self.namespace


def inject(engine, holder_id: str, meta: dict, layers: list[torch.Tensor]) -> Holder | None:
    """Write received blocks into free blocks of `engine` and register them in its prefix
    cache; returns the holder that keeps them (free it with `release`), or None when
    nothing was injected (no blocks, another block size, or no room: the decode instance
    then computes the prompt itself)."""
    bm, cache = engine.block_manager, engine.runner.cache
    bs = bm.block_size
    tokens = list(meta["tokens"])
    n = len(tokens) // bs
    if n == 0 or meta["block_size"] != bs or not bm.enable_prefix_caching:
        return None
    if any(list(t.shape[1:]) != [n, *cache.k.shape[2:]] for t in layers):
        return None  # another model or layout: never write it
    if len(layers) != cache.k.shape[0]:
        return None
    # one extra token so that match_prefix may match all n blocks (it never matches the last)
    holder = Holder(holder_id, tokens + [0], tuple(meta["namespace"]))
    cached = bm.match_prefix(holder)
    if not bm.allocate_slots(holder, n * bs - cached, num_cached_tokens=cached):
        return None
    table = bm.block_table(holder_id)
    fresh = torch.tensor(table[cached // bs : n], dtype=torch.long, device=cache.k.device)
    if fresh.numel():
        first = cached // bs
        for layer, kv in enumerate(layers):
            kv = kv.to(cache.k.device, cache.k.dtype)
            cache.k[layer].index_copy_(0, fresh, kv[0, first:])
            cache.v[layer].index_copy_(0, fresh, kv[1, first:])
    holder.num_computed_tokens = n * bs
    bm.cache_full_blocks(holder)
    return holder


def release(engine, holder: Holder) -> None:
    engine.block_manager.free(holder)
