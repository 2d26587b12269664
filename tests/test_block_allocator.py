"""BlockAllocator: reference counts, free / used / cached states, LRU eviction, errors."""

import pytest

from moska.cache import BlockAllocator, OutOfBlocks


def test_allocate_and_free_counts():
    a = BlockAllocator(num_blocks=4, block_size=16)
    blocks = a.allocate(3)
    assert len(set(blocks)) == 3 and all(a.ref_count(b) == 1 for b in blocks)
    assert (a.num_free, a.num_used, a.num_cached, a.num_available) == (1, 3, 0, 1)
    a.check_integrity()
    for b in blocks:
        a.decref(b)
    assert (a.num_free, a.num_used) == (4, 0)
    assert a.allocate(0) == []
    a.check_integrity()


def test_shared_block_ref_counts():
    a = BlockAllocator(4, 16)
    (b,) = a.allocate(1)
    a.incref(b)
    a.incref(b)
    assert a.ref_count(b) == 3 and a.num_used == 1
    a.decref(b)
    a.decref(b)
    assert a.ref_count(b) == 1 and a.num_free == 3
    a.decref(b)
    assert a.ref_count(b) == 0 and a.num_free == 4
    a.check_integrity()


def test_errors():
    with pytest.raises(ValueError):
        BlockAllocator(0, 16)
    with pytest.raises(ValueError):
        BlockAllocator(4, 0)
    a = BlockAllocator(4, 16)
    a.allocate(3)
    with pytest.raises(OutOfBlocks, match="asked for 2 blocks but only 1"):
        a.allocate(2)
    assert a.num_free == 1  # a failed allocation changes nothing
    with pytest.raises(ValueError):
        a.allocate(-1)
    with pytest.raises(ValueError, match="double free"):
        a.decref(3)
    with pytest.raises(ValueError, match="free"):
        a.incref(3)
    with pytest.raises(ValueError):
        a.set_hashed(3, True)  # only used blocks can be hashed
    assert issubclass(OutOfBlocks, RuntimeError)
    a.check_integrity()


def test_hashed_blocks_are_cached_then_evicted_lru():
    evicted = []
    a = BlockAllocator(4, 16, on_evict=evicted.append)
    blocks = a.allocate(4)
    for b in blocks:
        a.set_hashed(b, True)
    for b in [2, 0, 3, 1]:
        a.decref(b)
    assert a.num_cached == 4 and a.num_free == 0 and a.num_available == 4
    assert a.cached_lru_order() == [2, 0, 3, 1]
    a.check_integrity()
    # Reviving a cached block takes it out of the pool; releasing it makes it most recent.
    a.incref(2)
    assert a.ref_count(2) == 1 and not a.is_cached(2)
    a.decref(2)
    assert a.cached_lru_order() == [0, 3, 1, 2]
    assert a.allocate(2) == [0, 3]
    assert evicted == [0, 3] and not a.is_hashed(0) and not a.is_hashed(3)
    a.check_integrity()


def test_free_blocks_are_used_before_evicting():
    evicted = []
    a = BlockAllocator(3, 16, on_evict=evicted.append)
    (b,) = a.allocate(1)
    a.set_hashed(b, True)
    a.decref(b)
    assert sorted(a.allocate(2)) == [1, 2] and evicted == []
    assert a.allocate(1) == [b] and evicted == [b]
    a.check_integrity()


def test_unhashing_a_cached_block_frees_it():
    a = BlockAllocator(2, 16)
    (b,) = a.allocate(1)
    a.set_hashed(b, True)
    a.decref(b)
    assert a.is_cached(b)
    a.set_hashed(b, False)
    assert not a.is_cached(b) and a.num_free == 2
    a.check_integrity()
