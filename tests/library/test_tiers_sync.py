"""Sync-free tiered reads (library/tier_ledger.py): a layer whose cache holds every chunk,
residency-biased reads and the skip policy under `sync="step"` read nothing on the host per
layer (counted: `moska/bench/tier_host_work.py`), stay exact where they read, and settle
their counts once per step, the skip policy's misses fetched for later steps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moska.bench.tier_host_work import measure
from moska.host_syncs import count_host_syncs
from moska.kernel_ops import kernel_ops
from moska.kernels.selections import from_topk
from moska.kernels.shared_attention import grouped_shared_attention_ref
from moska.library.chunk_store import MemoryChunks
from moska.library.tier_config import TierConfig
from moska.library.tiers import ChunkTiers

L, C, CL, HKV, D, B = 2, 6, 8, 2, 16, 4
DEVICES = [
    "cpu",  # on CUDA: pinned uploads of the slot tables, events on the counts' copies
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


def _library(seed: int):
    g = torch.Generator().manual_seed(seed)
    k = [torch.randn(C * CL, HKV, D, generator=g) for _ in range(L)]
    v = [torch.randn(C * CL, HKV, D, generator=g) for _ in range(L)]
    return k, v, [i * CL for i in range(C + 1)]


def _sel(rows, device="cpu"):  # [[chunk, ...] per request] -> Selections
    return from_topk(torch.tensor(rows, device=device).unsqueeze(1), HKV, C)


def _no_kernel(q, k_pool, v_pool, table, sel, sm_scale, **kw):
    n = sel.req.numel()  # the kernel is left out of the counts: only the tiers' work counts
    return q.new_zeros(n, q.shape[1] // k_pool.shape[1], q.shape[2]), q.new_zeros(n, 1)


def test_host_work_per_layer_is_sync_free_where_nothing_can_miss():
    ops = replace(kernel_ops("torch"), grouped_shared=_no_kernel)
    dev = torch.device("cpu")
    rows = {m: measure(m, dev, ops, layers=2, chunks=8, batch=4, steps=3) for m in
            ("allhit-wait", "resident-only", "skip-step", "hits-wait")}  # fmt: skip
    for mode in ("allhit-wait", "resident-only", "skip-step"):
        assert rows[mode]["host_syncs_per_layer"] == 0, rows[mode]
        assert rows[mode]["ops"]["index_add_"] == rows[mode]["layer_steps"]  # the count
    assert rows["allhit-wait"]["device_ops_per_layer"] <= 2  # count + the per-step settle
    # "wait" with a partial cache reads each layer's counts once (no unique: no sort)
    assert rows["hits-wait"]["host_syncs_per_layer"] == 1
    assert "unique" not in rows["hits-wait"]["syncs"]


@pytest.mark.parametrize("device", DEVICES)
def test_allhit_and_skip_step_reads_equal_the_resident_library(device):
    k, v, offs = _library(0)
    ops = kernel_ops("torch")  # the reference kernel, on either device
    offsets = torch.tensor(offs, dtype=torch.int32, device=device)
    q = torch.randn(B, 2 * HKV, D, generator=torch.Generator().manual_seed(1)).to(device)
    full = ChunkTiers(offs, MemoryChunks(k, v), TierConfig(gpu_budget="1"), q.device, C, 1)
    for layer in range(L):
        full.prefetch(layer, list(range(C)))
    cfg = TierConfig(gpu_budget="1", miss_policy="skip", sync="step", prefetch="none")
    skip = ChunkTiers(offs, MemoryChunks(k, v), cfg, q.device, 3, 1)
    skip.prefetch(0, [0, 1, 2])  # layer 0: chunks 0-2 resident, 3 and 4 not
    sel = _sel([[0, 3], [1, 4], [3, 4], [2, 0]], device)
    kd, vd = [t.to(device) for t in k], [t.to(device) for t in v]
    for layer in range(L):
        o_ref, lse_ref = grouped_shared_attention_ref(q, kd[layer], vd[layer], offsets, sel, 0.25)
        o, lse, same = full.attend(ops, layer, q, sel, 0.25)
        assert same is sel
        assert (o - o_ref).abs().max() / o_ref.abs().max() < 1e-4
        assert torch.allclose(lse, lse_ref, atol=1e-5)
    o, lse, kept = skip.attend(ops, 0, q, sel, 0.25)
    assert kept is sel  # whole: the absent chunks' selections read as empty
    o_ref, lse_ref = grouped_shared_attention_ref(q, kd[0], vd[0], offsets, sel, 0.25)
    absent = (sel.chunk == 3) | (sel.chunk == 4)
    assert torch.isinf(lse[absent]).all() and (o[absent] == 0).all()
    assert torch.allclose(o[~absent], o_ref[~absent], atol=1e-5)
    assert torch.allclose(lse[~absent], lse_ref[~absent], atol=1e-5)
    full.flush()
    skip.flush()
    assert full.stats.hits["gpu"] == 5 * L and full.stats.misses["gpu"] == 0
    assert skip.stats.skipped == int(absent.sum()) and skip.stats.misses["gpu"] == 2
    # 3 and 4 (3 selections each) replace 1 and 2 (one each); 0 (2) stays
    assert skip.resident(0) == {0, 3, 4}


@pytest.mark.parametrize("device", DEVICES)
def test_skip_step_settles_without_flush_within_the_lag(device):
    k, v, offs = _library(2)
    cfg = TierConfig(gpu_budget="1", miss_policy="skip", sync="step", prefetch="none")
    tiers = ChunkTiers(offs, MemoryChunks(k, v), cfg, torch.device(device), 2, 1)
    ops = kernel_ops("torch")
    q = torch.randn(B, 2 * HKV, D, generator=torch.Generator().manual_seed(3)).to(device)
    sel = _sel([[4, 5]] * B, device)
    seen = []
    for _ in range(tiers.ledger.max_lag + 2):  # one layer per step: layer 0 again starts one
        _, lse, _ = tiers.attend(ops, 0, q, sel, 0.25)
        seen.append(bool(torch.isfinite(lse).all()))
    assert not seen[0] and seen[-1]  # misses fetched a few steps later, no flush
    assert tiers.resident(0) == {4, 5} and tiers.stats.skipped >= sel.req.numel()


def test_slot_table_updates_need_no_host_read():
    k, v, offs = _library(4)
    tiers = ChunkTiers(offs, MemoryChunks(k, v), TierConfig(gpu_budget="1"), torch.device("cpu"),
                       2, 1)  # fmt: skip
    with count_host_syncs() as syncs:
        tiers.prefetch(1, [5, 2])
        tiers.prefetch(1, [3])  # evicts one of them
    assert syncs.n == 0
    starts, ends = tiers.tables[1]
    resident = tiers.resident(1)
    assert len(resident) == 2 and 3 in resident
    for c in range(C):
        n = int(ends[c] - starts[c])
        assert n == (CL if c in resident else 0)
        if c in resident:
            assert torch.equal(tiers.k_pools[1][starts[c] : ends[c]], k[1][offs[c] : offs[c + 1]])


def test_skip_step_fetches_misses_into_a_cache_that_fits_the_library():
    k, v, offs = _library(5)
    cfg = TierConfig(gpu_budget="1", miss_policy="skip", sync="step", prefetch="none")
    tiers = ChunkTiers(offs, MemoryChunks(k, v), cfg, torch.device("cpu"), C, 1)
    q = torch.randn(B, 2 * HKV, D, generator=torch.Generator().manual_seed(6))
    tiers.attend(kernel_ops("torch"), 0, q, _sel([[1, 4]] * B), 0.25)  # nothing resident yet
    tiers.flush()
    assert tiers.resident(0) == {1, 4} and tiers.stats.misses["gpu"] == 2


def test_sync_mode_is_validated_by_name():
    with pytest.raises(ValueError, match="library_tier_sync"):
        TierConfig(gpu_budget="1GiB", sync="never")
