"""Chunk-affinity scheduling of a tiered library (library/tier_affinity.py): who runs, the
wait bound, what is fetched; a scheduled step through the tiers equals plain attention over
the whole library; the floor arithmetic of bench/tier_floor.py; the benchmark's dry run."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from moska.bench.tier_floor import floor, needed
from moska.bench.tier_schedule import RequestTrace
from moska.kernel_ops import kernel_ops
from moska.kernels.selections import from_topk
from moska.kernels.shared_attention import grouped_shared_attention_ref
from moska.library.chunk_store import MemoryChunks
from moska.library.tier_affinity import AffinityConfig, AffinityScheduler
from moska.library.tiers import ChunkTiers, TierConfig


def test_runs_ready_requests_and_fetches_the_most_wanted_chunk():
    s = AffinityScheduler(3, AffinityConfig(max_wait=5, swap_chunks=1))
    wants = {0: frozenset({0, 1}), 1: frozenset({1, 2}), 2: frozenset({3, 4}), 3: frozenset({4})}
    plan = s.plan(wants, {0, 1, 2})
    assert sorted(plan.run) == [0, 1] and plan.forced == 0
    # no free slot, and 0, 1 and 2 are read by the running requests: nothing is swapped
    assert plan.fetch == [] and plan.evict == []
    s.ran(plan.run)
    plan = s.plan({2: wants[2], 3: wants[3]}, {0, 1, 2})  # 0 and 1 finished
    assert plan.run == [3]  # min_run: the one of fewest misses among the longest-waiting
    # 4 comes with request 3's step; 3 is fetched for request 2 in place of an idle chunk
    assert plan.fetch == [3] and len(plan.evict) == 1 and plan.evict[0] in {0, 1, 2}


def test_no_request_waits_longer_than_max_wait():
    rng = random.Random(0)
    max_wait, slots, chunks = 3, 4, 12
    s = AffinityScheduler(slots, AffinityConfig(max_wait=max_wait, swap_chunks=1))
    wants = {r: frozenset(rng.sample(range(chunks), 2)) for r in range(10)}
    resident: set[int] = set(range(slots))
    last = dict.fromkeys(wants, -1)
    for step in range(60):
        plan = s.plan(wants, resident)
        assert plan.run, "a step never runs empty"
        for r in plan.run:
            assert step - last[r] <= max_wait + 1
            last[r] = step
            if rng.random() < 0.3:  # its routing moves
                wants[r] = frozenset(rng.sample(range(chunks), 2))
        # what a wait step then makes resident, kept to the slots as the cache would
        used = set().union(*(wants[r] for r in plan.run))
        resident = (resident - set(plan.evict)) | set(plan.fetch)
        resident = set(sorted(used)[:slots]) | set(sorted(resident - used)[: slots - len(used)])
        s.ran(plan.run)
    assert all(step - v <= max_wait + 1 for v in last.values())


def test_affinity_steps_through_tiers_equal_plain_attention():
    """Only some requests run each step, their routing moves, the held ones' chunks come in
    between steps (2 of 6 chunks resident): each step's output equals the reference over
    the whole library for the rows that ran."""
    g = torch.Generator().manual_seed(3)
    layers, hkv, grp, d, chunk, chunks, batch, k = 2, 2, 2, 8, 8, 6, 5, 2
    offs = [i * chunk for i in range(chunks + 1)]
    ks = [torch.randn(offs[-1], hkv, d, generator=g) for _ in range(layers)]
    vs = [torch.randn(offs[-1], hkv, d, generator=g) for _ in range(layers)]
    cfg = TierConfig(gpu_budget="1", eviction="lfu", miss_policy="wait", prefetch="none")
    tiers = ChunkTiers(offs, MemoryChunks(ks, vs), cfg, torch.device("cpu"), 2, 1)
    ops = kernel_ops("torch")
    trace = RequestTrace(chunks, batch, k, "zipf1.0", 0.5, 1e9, seed=1)
    sched = AffinityScheduler(2, AffinityConfig(max_wait=2, swap_chunks=1))
    offsets = torch.tensor(offs, dtype=torch.int32)
    ran = 0
    for _ in range(6):
        resident = tiers.resident(0) & tiers.resident(1)
        plan = sched.plan(trace.wants(), resident)
        run = sorted(plan.run)
        rows = torch.from_numpy(trace.advance(run))
        q = torch.randn(len(run), hkv * grp, d, generator=g)
        for layer in range(layers):
            sel = from_topk(rows.unsqueeze(1), hkv, chunks, use_triton=False)
            o, lse, sel2 = tiers.attend(ops, layer, q, sel, d**-0.5, wait=True)
            o_ref, lse_ref = grouped_shared_attention_ref(
                q, ks[layer], vs[layer], offsets, sel, d**-0.5
            )
            assert sel2.req.numel() == sel.req.numel()
            assert (o - o_ref).abs().max() / o_ref.abs().max() < 1e-4
            assert torch.allclose(lse, lse_ref, rtol=1e-4, atol=1e-4)
            tiers.prefetch(layer, plan.fetch, sorted(resident - set(plan.evict)))
        sched.ran(plan.run)
        ran += len(run)
    assert ran >= 6


def test_request_trace_rows_distinct_and_waiting_rows_keep_routing():
    t = RequestTrace(10, 6, 3, "zipf1.0", churn=1.0, lifetime=1e9, seed=0)
    before = t.chosen.copy()
    rows = t.advance([1, 4])
    assert all(len(set(r.tolist())) == 3 for r in t.chosen)
    assert np.array_equal(t.chosen[[0, 2, 3, 5]], before[[0, 2, 3, 5]])
    assert rows.shape == (2, 3)
    t0 = RequestTrace(10, 6, 3, "uniform", churn=0.0, lifetime=1e9, seed=0)
    t0.advance(list(range(6)))
    assert t0.kept == t0.seen == 18


def test_floor_and_what_a_target_needs_agree():
    t_res, h2d, demanded = 0.02, 50e9, 24 * 2**30
    need = needed(0.8, t_res, h2d, demanded)
    at_budget = floor(t_res, need["max_missing_bytes_per_step"], h2d)
    assert at_budget == pytest.approx(0.8)
    assert floor(t_res, 2 * need["max_missing_bytes_per_step"], h2d) == pytest.approx(0.4)
    assert floor(t_res, 0.0, h2d, t_overhead=0.04) == pytest.approx(0.5)
    assert need["needed_hit_rate"] == pytest.approx(1 - 1.25e9 / demanded)


def test_tiers_benchmark_dry_run_has_the_baseline_and_the_floor():
    from moska.bench.tiers import main

    r = main(["--cpu-dry-run", "--dists", "zipf1.0", "--churns", "0.5",
              "--modes", "allhit-wait,affinity-wait"])  # fmt: skip
    s = r["summary"]["zipf1.0/churn0.5"]
    assert s["resident_tokens_per_s"] > 0 and "for_0.8x" in s
    assert s["allhit-wait"]["gpu_hit_rate"] == 1.0
    aff = s["affinity-wait"]
    assert 0 < aff["requests_per_step"] <= 8 and aff["max_gap_steps"] <= 9
    assert 0.0 <= aff["floor_ratio"] <= 1.0
