"""The library arena (moska/library/arena.py): one slot space per model for every resident
library's KV. First-fit ranges that coalesce when freed; libraries loaded from disk or built
in memory land in it with the KV a plain load has; rows are freed only when nothing reads
the library any more (issue 15's rules: in use, never freed)."""

from __future__ import annotations

import gc

import pytest
import torch

from moska.library.arena import ArenaFullError, ArenaLayout, KVArena
from moska.library.errors import LibraryInUseError
from moska.library.loaded import load_library
from moska.library.manager import LibraryManager

DOC_A = "".join(chr(97 + (i * 7) % 26) for i in range(50))
DOC_B = "".join(chr(65 + (i * 5) % 26) for i in range(30))


def test_first_fit_ranges_coalesce():
    arena = KVArena(ArenaLayout(2, 2, 4, torch.float32, torch.device("cpu")), 10)
    a, b, c = arena.allocate(4), arena.allocate(3), arena.allocate(3)
    assert (a.start, b.start, c.start) == (0, 4, 7) and arena.free_rows == 0
    with pytest.raises(ArenaFullError, match="0 of 10 rows free"):
        arena.allocate(1)
    b.release()
    with pytest.raises(ArenaFullError):
        arena.allocate(4)  # 3 rows free, not 4 in a row
    d = arena.allocate(2)
    assert d.start == 4 and d.k(1).shape == (2, 2, 4)
    a.release()
    d.release()  # [0, 4) + [4, 6) + [6, 7) make one range
    assert arena.largest_free == 7 and arena.allocate(7).start == 0
    assert c.k(0).data_ptr() == arena.k_pools[0][7].data_ptr()


def test_rows_are_freed_only_when_nothing_reads_the_library(tiny_model, tmp_path):
    mgr = LibraryManager(tmp_path, tiny_model, progress=False, arena=1 << 20)
    with torch.inference_mode():  # the arena is made here; later loads write it outside
        mgr.build("a", [("a.txt", DOC_A)], chunk_size=16, mode="independent")
    mgr.build("b", [("b.txt", DOC_B)], chunk_size=16, mode="independent")
    a, b = mgr.get("a"), mgr.get("b")  # built in memory, moved into the arena
    assert a.arena_range.arena is b.arena_range.arena is mgr.arena
    plain = load_library(tmp_path, "b", None, progress=False)  # pools of its own
    for layer in range(b.num_kv_layers):
        assert b.k_pools[layer].data_ptr() == b.arena_range.k(layer).data_ptr()
        assert torch.equal(b.k_pools[layer], plain.k_pools[layer])
        assert torch.equal(b.v_pools[layer], plain.v_pools[layer])
    rows, free = a.num_tokens, mgr.arena.free_rows

    held = mgr.acquire("a")  # a request reads it
    with pytest.raises(LibraryInUseError):
        mgr.delete("a")
    mgr.unload("a")  # unloaded under the request: its rows stay
    del a
    gc.collect()
    assert mgr.arena.free_rows == free
    mgr.release(held)
    del held  # the last reader is gone: the rows are free
    gc.collect()
    assert mgr.arena.free_rows == free + rows

    again = mgr.get("a")  # loaded from disk into the freed range
    assert again.arena_range is not None and again.arena_range.start == 0
    plain = load_library(tmp_path, "a", None, progress=False)
    for layer in range(again.num_kv_layers):
        assert torch.equal(again.k_pools[layer], plain.k_pools[layer])
        assert torch.equal(again.v_pools[layer], plain.v_pools[layer])
    assert mgr.arena.free_rows == free


def test_a_library_the_arena_cannot_hold_keeps_its_own_pools(tiny_model, tmp_path):
    mgr = LibraryManager(tmp_path, tiny_model, progress=False, arena=None)
    mgr.build("a", [("a.txt", DOC_A)], chunk_size=16, mode="independent")
    assert mgr.arena is None and mgr.get("a").arena_range is None
    small = LibraryManager(tmp_path, tiny_model, progress=False, arena=1)
    lib = small.get("a")  # one row of arena: far too small
    assert lib.arena_range is None and lib.k_pools[0].shape[0] == lib.num_tokens
