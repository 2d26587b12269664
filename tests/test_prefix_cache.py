"""BlockManager + PrefixCache: prefix hits, namespaces, collisions, LRU eviction, integrity."""

import random
from typing import NamedTuple

import pytest

from moska.cache import BlockManager, PrefixCache, cache_namespace
from moska.engine.request import Request
from moska.engine.sampling_params import SamplingParams


class Lib(NamedTuple):
    """A library handle as a request holds it: the build id is what caches key on."""

    name: str
    build_id: str
    position_offset: int = 0


def make_request(rid, tokens, library=None, top_k_chunks=None):
    if isinstance(library, str):
        library = Lib(library, f"{library}-build1")
    return Request(
        request_id=rid,
        prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(max_tokens=64),
        library=library,
        top_k_chunks=top_k_chunks,
    )


def admit(bm, req, num_new=None):
    """Admit with prefix reuse and compute `num_new` tokens (default: the rest)."""
    cached = bm.match_prefix(req)
    num_new = req.num_tokens - cached if num_new is None else num_new
    assert bm.allocate_slots(req, num_new, num_cached_tokens=cached)
    assert req.num_computed_tokens == cached
    req.num_computed_tokens += num_new
    bm.cache_full_blocks(req)
    bm.check_integrity()
    return cached


def test_prefix_hit_shares_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_request("a", range(10))
    assert admit(bm, a) == 0
    assert len(bm.block_table(a.request_id)) == 3 and len(bm.prefix_cache) == 2
    b = make_request("b", list(range(9)) + [99, 98])
    assert admit(bm, b) == 8
    assert (
        bm.block_table(b.request_id)[:2] == bm.block_table(a.request_id)[:2]
        and bm.block_table(b.request_id)[2] != bm.block_table(a.request_id)[2]
    )
    assert [bm.allocator.ref_count(x) for x in bm.block_table(a.request_id)[:2]] == [2, 2]
    bm.free(a)
    assert [bm.allocator.ref_count(x) for x in bm.block_table(b.request_id)[:2]] == [1, 1]
    bm.free(b)
    assert bm.usage == 0.0 and bm.num_free_blocks == 16
    assert bm.allocator.num_cached == 2  # the shared full blocks; partial ones are free
    bm.check_integrity()


def test_hit_never_covers_the_last_token():
    bm = BlockManager(16, 4)
    admit(bm, make_request("a", range(8)))
    assert bm.match_prefix(make_request("b", range(8))) == 4  # 7 // 4 full blocks
    assert bm.match_prefix(make_request("c", range(9))) == 8
    assert bm.match_prefix(make_request("d", range(3))) == 0
    bm.check_integrity()


def test_hit_survives_release_to_the_cached_pool():
    bm = BlockManager(16, 4)
    a = make_request("a", range(12))
    admit(bm, a)
    bm.free(a)
    assert bm.usage == 0.0 and bm.allocator.num_cached == 3
    b = make_request("b", range(13))
    assert admit(bm, b) == 12
    assert bm.allocator.num_cached == 0
    bm.check_integrity()


def test_no_hit_across_libraries_or_routing():
    bm = BlockManager(32, 4)
    admit(bm, make_request("a", range(10), library="docs"))
    assert bm.match_prefix(make_request("b", range(10), library="docs")) == 8
    assert bm.match_prefix(make_request("c", range(10), library="code")) == 0
    assert bm.match_prefix(make_request("d", range(10))) == 0
    assert bm.match_prefix(make_request("e", range(10), library="docs", top_k_chunks=2)) == 0
    assert cache_namespace(make_request("f", [1], library="docs")) == ("docs-build1", None)
    # a rebuild under the same name is a new build: no hit on the old build's KV
    rebuilt = Lib("docs", "docs-build2")
    assert bm.match_prefix(make_request("g", range(10), library=rebuilt)) == 0
    bm.check_integrity()


def test_forced_collision_never_reuses_wrong_kv():
    # Every block hashes to the same value: only the token check keeps lookups correct.
    bm = BlockManager(32, 4, hash_fn=lambda parent, tokens, namespace: 42)
    a = make_request("a", range(10))
    admit(bm, a)
    assert len(bm.prefix_cache) == 1  # block 1 collided with block 0: chain stops there
    b = make_request("b", [7, 7, 7, 7, 7, 7, 7, 7, 7])
    assert admit(bm, b) == 0
    assert not set(bm.block_table(b.request_id)) & set(bm.block_table(a.request_id))
    c = make_request("c", range(10))
    assert admit(bm, c) == 4  # the genuine block 0 still hits
    assert bm.block_table(c.request_id)[0] == bm.block_table(a.request_id)[0]
    bm.check_integrity()


def test_collision_with_a_monkeypatched_default_hash(monkeypatch):
    import moska.cache.prefix_cache as pc

    monkeypatch.setattr(pc, "hash_block", lambda parent, tokens, namespace: 7)
    bm = BlockManager(16, 4, hash_fn=pc.hash_block)
    admit(bm, make_request("a", [1, 2, 3, 4, 5]))
    assert bm.match_prefix(make_request("b", [1, 2, 3, 5, 5])) == 0
    assert bm.match_prefix(make_request("c", [1, 2, 3, 4, 5])) == 4
    bm.check_integrity()


def test_orphan_child_is_not_reused_after_its_parent_hash_is_reused():
    # First blocks all hash to 0 and later blocks ignore their parent: a child left behind
    # by an evicted parent must not attach to a new, different parent with the same hash.
    def weak_hash(parent, tokens, namespace):
        return 0 if parent is None else hash(tokens)

    cache = PrefixCache(block_size=2, hash_fn=weak_hash)
    tokens_a = [1, 1, 2, 2]
    hashes_a = cache.extend_hashes([], tokens_a, None)
    e0 = cache.insert(0, hashes_a[0], None, (1, 1), None)
    cache.insert(1, hashes_a[1], e0, (2, 2), None)
    cache.remove_block(0)  # evict the parent only
    tokens_b = [3, 3, 2, 2]
    hashes_b = cache.extend_hashes([], tokens_b, None)
    assert hashes_b == [0, hashes_a[1]]
    cache.insert(5, hashes_b[0], None, (3, 3), None)
    chain = cache.match(hashes_b, tokens_b, None, max_blocks=2)
    assert [e.block_id for e in chain] == [5]  # not block 1, computed after (1, 1)
    cache.check_integrity()


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    b = make_request("b", [6, 7, 8, 9, 10])
    admit(bm, a)
    admit(bm, b)
    a_full, b_full = bm.block_table(a.request_id)[:2], bm.block_table(b.request_id)[:2]
    bm.free(a)
    bm.free(b)
    # Released tail first, so a request's later blocks are evicted before its earlier ones.
    lru = bm.allocator.cached_lru_order()
    assert lru == a_full[::-1] + b_full[::-1]
    c = make_request("c", list(range(20, 28)))
    cached = bm.match_prefix(c)
    assert cached == 0 and bm.allocate_slots(c, 7)  # 4 blocks: 2 free + evict a's 2
    assert set(bm.block_table(c.request_id)) >= set(a_full)
    assert bm.match_prefix(make_request("a2", [1, 2, 3, 4, 5])) == 0
    assert bm.match_prefix(make_request("b2", [6, 7, 8, 9, 10])) == 4
    bm.check_integrity()


def test_hit_refreshes_lru_position():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3])
    b = make_request("b", [4, 5, 6])
    admit(bm, a)
    admit(bm, b)
    bm.free(a)
    bm.free(b)
    a2 = make_request("a2", [1, 2, 9])
    assert admit(bm, a2) == 2  # revives a's block: now b's is the oldest cached
    bm.free(a2)
    c = make_request("c", [7, 8, 9, 10, 11])
    assert bm.allocate_slots(c, 5)  # 3 blocks: the 2 free ones, then evicts b's block
    assert bm.match_prefix(make_request("b3", [4, 5, 6])) == 0
    assert bm.match_prefix(make_request("a3", [1, 2, 6])) == 2
    bm.check_integrity()


def test_allocate_slots_refuses_without_side_effects():
    bm = BlockManager(4, 4)
    a = make_request("a", range(12))
    assert bm.allocate_slots(a, 12)
    b = make_request("b", range(100, 108))
    assert not bm.can_allocate(b, 8)
    assert not bm.allocate_slots(b, 8)
    assert bm.block_table(b.request_id) == [] and bm.num_free_blocks == 1
    assert bm.can_allocate(b, 4) and bm.allocate_slots(b, 4)
    bm.check_integrity()


def test_duplicate_blocks_stay_unhashed_and_chain_continues():
    bm = BlockManager(32, 2)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7])
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7])
    # Both admitted before either computed anything: no hit, identical KV twice.
    assert bm.allocate_slots(a, 4) and bm.allocate_slots(b, 4)
    a.num_computed_tokens = b.num_computed_tokens = 4
    bm.cache_full_blocks(a)
    bm.cache_full_blocks(b)
    assert len(bm.prefix_cache) == 2
    assert bm.allocate_slots(b, 3)
    b.num_computed_tokens = 7
    bm.cache_full_blocks(b)  # b's block 2 registered after a's blocks 0-1
    assert len(bm.prefix_cache) == 3
    assert bm.match_prefix(make_request("c", [1, 2, 3, 4, 5, 6, 7])) == 6
    bm.check_integrity()


def test_reset_prefix_cache():
    bm = BlockManager(8, 2)
    a = make_request("a", [1, 2, 3, 4, 5])
    admit(bm, a)
    bm.free(a)
    assert bm.allocator.num_cached == 2
    bm.reset_prefix_cache()
    assert bm.allocator.num_cached == 0 and len(bm.prefix_cache) == 0
    assert bm.match_prefix(make_request("b", [1, 2, 3, 4, 5])) == 0
    bm.check_integrity()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_keep_integrity_and_correct_kv(seed):
    """Thousands of random admits / extends / frees. A shadow map records which token
    prefix each block's KV was computed for; every prefix hit must return matching KV."""
    rng = random.Random(seed)
    bs = 4
    bm = BlockManager(num_blocks=48, block_size=bs)
    kv: dict[int, tuple] = {}  # block id -> (namespace, token prefix through this block)
    live: list[Request] = []
    stems = [[rng.randrange(8) for _ in range(24)] for _ in range(4)]
    libraries = [None, "lib-a", "lib-b"]
    next_id = 0

    def compute(req, num_new):
        start = req.num_computed_tokens
        req.num_computed_tokens += num_new
        tokens = req.all_token_ids
        ns = cache_namespace(req)
        for i in range(start // bs, req.num_computed_tokens // bs):
            kv[bm.block_table(req.request_id)[i]] = (ns, tuple(tokens[: (i + 1) * bs]))
        bm.cache_full_blocks(req)

    for _ in range(3000):
        op = rng.random()
        if op < 0.35 or not live:
            stem = rng.choice(stems)
            prompt = stem[: rng.randint(1, len(stem))] + [rng.randrange(8) for _ in range(3)]
            req = make_request(f"r{next_id}", prompt, library=rng.choice(libraries))
            next_id += 1
            cached = bm.match_prefix(req)
            assert cached % bs == 0 and cached <= req.num_tokens - 1
            num_new = rng.randint(1, req.num_tokens - cached)
            if bm.allocate_slots(req, num_new, num_cached_tokens=cached):
                ns, tokens = cache_namespace(req), req.all_token_ids
                for i in range(cached // bs):
                    assert kv[bm.block_table(req.request_id)[i]] == (
                        ns,
                        tuple(tokens[: (i + 1) * bs]),
                    )
                compute(req, num_new)
                live.append(req)
            else:
                assert bm.block_table(req.request_id) == [] and req.num_computed_tokens == 0
                bm.free(req)  # drops the memoized hashes
        elif op < 0.75:
            req = rng.choice(live)
            if req.num_computed_tokens == req.num_tokens:
                req.output_token_ids.append(rng.randrange(8))
            num_new = rng.randint(1, req.num_tokens - req.num_computed_tokens)
            if bm.allocate_slots(req, num_new):
                compute(req, num_new)
        else:
            req = live.pop(rng.randrange(len(live)))
            bm.free(req)
        bm.check_integrity()
    for req in live:
        bm.free(req)
    bm.check_integrity()
    assert bm.usage == 0.0
