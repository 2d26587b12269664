"""The host-sync counter (`moska/host_syncs.py`) behind FlexiCache's host reads and
SemShareKV's per-stage counts: which calls count, by name, on which device, and what
pausing, nesting and other threads leave out."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch

from moska.flexicache import host_reads
from moska.host_syncs import count_host_syncs, current, uncounted


def _calls(t: torch.Tensor, idx: torch.Tensor) -> None:
    """One of each kind of call, syncing or not, on a 1-d tensor `t` of >= 4 values."""
    bool(t[0] > 0), int(idx[0]), float(t[1]), t[2].item(), t.tolist()
    t.nonzero(), torch.nonzero(t), t.unique(), torch.argwhere(t), t.masked_select(t > 0)
    reps = torch.arange(len(t)) % 3
    t.repeat_interleave(reps), t.repeat_interleave(2)  # by a tensor: syncs
    t.repeat_interleave(reps, output_size=sum(i % 3 for i in range(len(t))))
    t[t > 0], t[idx.abs() % len(t)], t[1:3], [0, 1, 2][idx[:1].abs() % 3]
    t.cpu(), t.numpy(), t.to("cpu"), t * 2 + 1, torch.softmax(t, 0)


def test_counts_each_sync_once_by_name_on_any_device():
    t, idx = torch.randn(8), torch.randint(-50, 50, (5,))
    with count_host_syncs() as syncs:
        _calls(t, idx)
    assert syncs.counts == {
        "__bool__": 1, "__int__": 1, "__float__": 1, "item": 1, "tolist": 1, "nonzero": 2,
        "unique": 1, "argwhere": 1, "masked_select": 1, "repeat_interleave": 1,
        "bool-mask index": 1, "__index__": 1, "cpu": 1, "numpy": 1,
    }  # fmt: skip
    assert syncs.n == sum(syncs.counts.values())
    with count_host_syncs(host_copies=False) as no_copies:
        _calls(t, idx)
    assert no_copies.counts == syncs.counts - Counter(cpu=1)


def test_device_only_counts_calls_on_device_tensors():
    """A meta tensor stands for a GPU tensor: its reads count (and fail) under device_only,
    the same reads of a host tensor do not."""
    t, m = torch.randn(4), torch.empty(4, device="meta")
    with count_host_syncs(device_only=True) as syncs:
        _calls(t, torch.randint(-50, 50, (5,)))
        for read in (m.tolist, m.cpu, lambda: m.to("cpu"), m.numpy, lambda: m[0].item()):
            with pytest.raises((RuntimeError, NotImplementedError, TypeError)):
                read()
    assert syncs.counts == {"tolist": 1, "cpu": 1, "to(cpu)": 1, "numpy": 1, "item": 1}


def test_paused_uncounted_and_other_threads_are_left_out_nested_blocks_count_in_both():
    t = torch.randn(6)
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(sum(t.tolist()) and t[0].item()))
    with count_host_syncs() as outer:
        assert current() is outer
        uncounted(lambda x: x.tolist())(t)
        with outer.paused():
            t.nonzero()
        thread.start()
        thread.join()
        with count_host_syncs() as inner:
            assert current() is inner
            t[1].item()
        assert current() is outer
        t.sum().item()
    assert current() is None and seen
    assert (inner.n, outer.counts) == (1, {"item": 2})  # an inner block's count in both


def test_flexicache_host_reads_count_their_own_set_of_calls():
    """`host_reads` keeps FlexiCache's names and counted calls (no `unique`, `to(cpu)`)."""
    t, idx = torch.randn(8), torch.randint(-50, 50, (5,))
    with host_reads.count_host_reads() as reads:
        assert host_reads._current[-1] is reads and isinstance(reads, host_reads.HostReads)
        _calls(t, idx)
    assert set(reads.counts) == {
        "__bool__", "__int__", "__float__", "item", "tolist", "nonzero", "bool-mask index",
        "__index__", "cpu", "numpy",
    }  # fmt: skip
    with count_host_syncs() as every:
        _calls(t, idx)
    assert reads.counts == {k: n for k, n in every.counts.items() if k in reads.counts}
    # left out: unique, argwhere, masked_select, repeat_interleave
    assert reads.n == every.n - 4 and host_reads.HostReads().n == 0
