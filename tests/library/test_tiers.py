"""Tiered libraries (GPU slot cache <- pinned CPU <- disk): the kernel reads chunks through a
slot table; eviction order; exactness through the engine at top_k = all under a budget
smaller than the library; the skip policy drops and reports; disk reads read only a
chunk's rows."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import pytest
import torch

from moska import LLM, SamplingParams
from moska.kernels.selections import from_topk
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref
from moska.kernels.shared_inputs import ChunkTable
from moska.library.chunk_cache import SlotCache
from moska.library.tiers import TierConfig

DOCS = [
    ("a.md", "MoSKA shares the KV of a long context across many requests."),
    ("b.md", "Each decode step routes every request to its top-k chunks and batches them."),
]
CHUNK = 16


# -- the kernel through a permuted slot table ----------------------------------------------

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CPU = pytest.mark.skipif(not _INTERPRET, reason="compiled Triton reads CUDA tensors only")
_CUDA = pytest.mark.skipif(
    _INTERPRET or not torch.cuda.is_available(),
    reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0; bf16 is wrong interpreted)",
)


@pytest.mark.parametrize(
    "device,dtype",
    [
        pytest.param("cpu", torch.float32, marks=_CPU),
        pytest.param("cpu", torch.float16, marks=_CPU),
        pytest.param("cuda", torch.bfloat16, marks=_CUDA),
    ],
)
def test_kernel_permuted_slot_table_equals_reference(device, dtype):
    g = torch.Generator().manual_seed(1)
    hkv, grp, d, b = 2, 2, 16, 3
    lens = [40, 17, 64, 5]  # ragged, one shorter than a block, one split by min_split
    offs = [0]
    for n in lens:
        offs.append(offs[-1] + n)
    k = torch.randn(offs[-1], hkv, d, generator=g).to(device, dtype)
    v = torch.randn(offs[-1], hkv, d, generator=g).to(device, dtype)
    q = torch.randn(b, hkv * grp, d, generator=g).to(device, dtype)
    # the chunks in permuted slots of 64 rows of a bigger pool, garbage between them
    slot_rows, perm = 64, [2, 0, 4, 1]
    k_slots = torch.randn(5 * slot_rows, hkv, d, generator=g).to(device, dtype) * 100
    v_slots = torch.randn(5 * slot_rows, hkv, d, generator=g).to(device, dtype) * 100
    starts = []
    for c, slot in enumerate(perm):
        r = slot * slot_rows
        k_slots[r : r + lens[c]] = k[offs[c] : offs[c + 1]]
        v_slots[r : r + lens[c]] = v[offs[c] : offs[c + 1]]
        starts.append(r)
    table = ChunkTable(
        torch.tensor(starts, dtype=torch.int32, device=device),
        torch.tensor([s + n for s, n in zip(starts, lens)], dtype=torch.int32, device=device),
    )
    topk = torch.tensor([[[0, 2]], [[1, 3]], [[3, 2]]], device=device)  # [B, 1, K]
    sel = from_topk(topk, hkv, len(lens))
    offsets = torch.tensor(offs, dtype=torch.int32, device=device)
    o_ref, lse_ref = grouped_shared_attention_ref(q, k, v, offsets, sel, 0.25)
    o, lse = grouped_shared_attention(q, k_slots, v_slots, table, sel, 0.25, min_split=16)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert (o.float() - o_ref).abs().max() / o_ref.abs().max() < tol
    assert torch.allclose(lse, lse_ref, rtol=tol, atol=tol)
    # the reference reads the slot table too; an absent chunk (start == end) gives -inf
    o2, _ = grouped_shared_attention_ref(q, k_slots, v_slots, table, sel, 0.25)
    assert torch.allclose(o2, o_ref, atol=1e-3 if device == "cpu" else 1e-2)  # bf16 ulp
    gone = ChunkTable(table.starts, table.starts.clone())
    _, lse3 = grouped_shared_attention_ref(q, k_slots, v_slots, gone, sel, 0.25)
    assert torch.isinf(lse3).all()


# -- eviction order --------------------------------------------------------------------------


def test_lru_evicts_least_recent_and_protects_the_step():
    c = SlotCache(3, "lru")
    for key in "abc":
        c.admit([key])
        c.tick()
    c.admit(["a"])  # a is now the most recent: b is the oldest
    c.tick()
    adm = c.admit(["d"])
    assert adm.evicted == ["b"] and "d" in c and "a" in c
    c.tick()
    adm = c.admit(["e"], protect=["c"])  # c is the oldest but protected -> a goes
    assert adm.evicted == ["a"]
    adm = c.admit(["x", "y", "z", "w"])  # more than the slots: overflow, no protected victim
    assert len(adm.loads) == 3 and adm.overflow == ["w"]


def test_lfu_keeps_a_frequent_chunk_through_a_burst():
    lru, lfu = SlotCache(2, "lru"), SlotCache(2, "lfu")
    for cache in (lru, lfu):
        for _ in range(8):  # "hot" read at every step
            cache.admit(["hot"])
            cache.tick()
        for key in ("x", "y"):  # a burst of one-off chunks
            cache.admit([key])
            cache.tick()
    assert "hot" not in lru and "hot" in lfu
    assert lfu.hits == 7 and lfu.misses == 3


# -- through the engine -----------------------------------------------------------------------


def _llm(root, **tiers):
    return LLM(
        None,
        device="cpu",
        dtype="float32",
        attention="torch",
        num_kv_blocks=64,
        max_model_len=512,
        library_root=str(root),
        **tiers,
    )


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An engine holding the library "docs" wholly in memory (the reference)."""
    llm = _llm(tmp_path_factory.mktemp("tiers"))
    llm.engine.libraries.build("docs", DOCS, chunk_size=CHUNK, mode="prefix")
    return llm


@pytest.fixture(scope="module")
def tiered(full):
    """The same library under a budget of 2 chunks per layer, no CPU tier (disk reads)."""
    lib = full.engine.libraries.get("docs")
    return _llm(
        full.engine.libraries.root, library_gpu_budget=_slot_budget(lib, 2),
        library_cpu_budget="0",
    )  # fmt: skip


def _slot_budget(lib, slots: int) -> str:
    k = lib.k_pools[0]
    per_chunk = 2 * CHUNK * k.shape[1] * k.shape[2] * k.element_size() * lib.num_kv_layers
    return f"{per_chunk * slots}B"


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randrange(3, 6))] for _ in range(n)]


def test_tiny_budget_top_k_all_equals_all_resident(full, tiered):
    lib = full.engine.libraries.get("docs")
    tl = tiered.engine.libraries.get("docs")
    assert lib.tiers is None and tl.tiers is not None
    assert tl.tiers.num_slots == 2 < tl.num_chunks
    prompts = _prompts(1, seed=3)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for k in (10**6, 3):  # all chunks (passes of 2 slots), then routed top-3
        want = full.generate(prompts, params, library="docs", top_k_chunks=k)
        got = tiered.generate(prompts, params, library="docs", top_k_chunks=k)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    st = tl.tiers.stats
    assert st.misses["gpu"] > 0 and st.misses["cpu"] > 0 and st.bytes_in["gpu"] > 0
    assert tl.tiers.cpu.disk.bytes_read > 0
    # the counters reach Prometheus
    from prometheus_client.parser import text_string_to_metric_families

    from moska.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.watch_library_tiers(tiered.engine.libraries.tier_stats)
    got = {
        (s.name, s.labels.get("tier")): s.value
        for fam in text_string_to_metric_families(metrics.render().decode())
        for s in fam.samples
        if s.labels.get("library") == "docs"
    }
    assert got[("moska_library_tier_misses_total", "gpu")] == st.misses["gpu"]
    assert got[("moska_library_tier_bytes_total", "cpu")] == st.bytes_in["cpu"] > 0


def test_skip_policy_drops_absent_chunks_and_reports_coverage(full, tiered):
    from dataclasses import replace

    from moska.library import load_library

    root = full.engine.libraries.root
    lib = full.engine.libraries.get("docs")
    skip = TierConfig(gpu_budget=_slot_budget(lib, 3), miss_policy="skip")
    tiers = load_library(root, "docs", None, "cpu", progress=False, tiers=skip).tiers
    g = torch.Generator().manual_seed(0)
    hkv, d = lib.k_pools[0].shape[1:]
    q = torch.randn(2, 4, d, generator=g)
    sel = from_topk(torch.tensor([[[0, 1]], [[1, 2]]]), hkv, lib.num_chunks)
    ops = full.engine.runner.ops
    _, lse, kept = tiers.attend(ops, 0, q, sel, 0.25)
    assert kept.req.numel() == 0 and tiers.stats.skipped == sel.req.numel()  # none resident
    _, lse, kept = tiers.attend(ops, 0, q, sel, 0.25)  # fetched meanwhile: all read now
    assert kept.req.numel() == sel.req.numel() and torch.isfinite(lse).all()
    # through the engine: the routing report's coverage shows the lost share
    tt = tiered.engine.libraries.get("docs").tiers
    tt.config = replace(tt.config, miss_policy="skip")
    try:
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        eng = tiered.engine
        before = tt.stats.skipped
        eng.add_request("r", _prompts(1, seed=5)[0], params, library="docs", top_k_chunks=4,
                        report_routing=True)  # fmt: skip
        outs = []
        while eng.has_unfinished_requests():
            outs += [o for o in eng.step() if o.finished]
        assert tt.stats.skipped > before
        assert outs[0].routing_coverage is not None and 0 <= outs[0].routing_coverage < 1
    finally:
        tt.config = replace(tt.config, miss_policy="wait")


def test_sync_free_skip_through_the_engine_reports_coverage(tiered):
    """sync="step": the skipping step reads no chunk ids on the host; the lost share still
    shows in the routing coverage, and the counts settle (flush) into the tier stats."""
    from dataclasses import replace

    tt = tiered.engine.libraries.get("docs").tiers
    old = tt.config
    tt.config = replace(old, miss_policy="skip", sync="step")
    try:
        eng, before = tiered.engine, tt.stats.skipped
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        eng.add_request("s", _prompts(1, seed=6)[0], params, library="docs", top_k_chunks=4,
                        report_routing=True)  # fmt: skip
        outs = []
        while eng.has_unfinished_requests():
            outs += [o for o in eng.step() if o.finished]
        tt.flush()
        assert tt.stats.skipped > before and len(outs[0].outputs[0].token_ids) == 2
        assert outs[0].routing_coverage is not None and 0 <= outs[0].routing_coverage < 1
    finally:
        tt.config = old


def test_skip_swap_plan_trades_cold_resident_chunks_for_hot_misses():
    from moska.library.tiers import _swap_plan

    demand = {0: 1, 1: 5, 2: 9, 3: 1, 4: 2}
    # 3 slots all holding routed chunks 0, 1, 4; misses 2 (9 selections) and 3 (1)
    fetch, keep = _swap_plan([2, 3], [0, 1, 4], demand, 3)
    assert fetch == [2] and sorted(keep) == [1, 4]  # 2 replaces 0; 3 does not beat 4
    # ties keep what is there (no churn under uniform routing)
    assert _swap_plan([3], [0], {0: 1, 3: 1}, 1) == ([], [0])
    # free slots take misses without giving anything up
    assert _swap_plan([2, 3], [0], demand, 3) == ([2, 3], [0])


def test_skip_policy_brings_in_hot_misses(full):
    from moska.library import load_library

    root = full.engine.libraries.root
    lib = full.engine.libraries.get("docs")
    skip = TierConfig(gpu_budget=_slot_budget(lib, 2), miss_policy="skip", prefetch="none")
    tiers = load_library(root, "docs", None, "cpu", progress=False, tiers=skip).tiers
    g = torch.Generator().manual_seed(1)
    hkv, d = lib.k_pools[0].shape[1:]
    ops = full.engine.runner.ops
    q = torch.randn(4, 4, d, generator=g)
    cold = from_topk(torch.tensor([[[0, 1]]] * 4), hkv, lib.num_chunks)
    tiers.attend(ops, 0, q, cold, 0.25)  # 0 and 1 fetched (free slots)
    assert tiers.resident(0) == {0, 1}
    # chunk 2 wanted by all four requests, 1 by one, 0 by three: 2 replaces 1
    hot = from_topk(torch.tensor([[[0, 2]], [[0, 2]], [[0, 2]], [[1, 2]]]), hkv, lib.num_chunks)
    _, _, kept = tiers.attend(ops, 0, q, hot, 0.25)
    assert kept.req.numel() == 4 * hkv  # this step read 0 and 1 only
    assert tiers.resident(0) == {0, 2}
    _, lse, kept = tiers.attend(ops, 0, q, hot, 0.25)
    assert kept.req.numel() == 7 * hkv and torch.isfinite(lse).all()  # only 1's row skipped


def test_disk_reads_only_the_chunk_rows(full, monkeypatch):
    from safetensors.torch import load_file

    from moska.library.chunk_store import DiskChunks
    from moska.library.format import layer_file, read_manifest

    directory = full.engine.libraries.root / "docs"
    manifest = read_manifest(directory)
    disk = DiskChunks(directory, manifest)
    calls = []
    real = os.preadv

    def spy(fd, buffers, offset):
        calls.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", spy)
    offs = manifest.chunk_offsets
    c = 2
    want = load_file(str(directory / layer_file(1)))["v"][offs[c] : offs[c + 1]]
    out = torch.empty_like(want)
    disk.read_rows(1, "v", offs[c], offs[c + 1], out)
    assert torch.equal(out, want)
    assert len(calls) == 1 and calls[0][1] == want.numel() * want.element_size()
    assert disk.bytes_read == calls[0][1]
    disk.close()


def test_budget_validation_names_the_field():
    with pytest.raises(ValueError, match="library_gpu_budget"):
        TierConfig(gpu_budget="lots")
    with pytest.raises(ValueError, match="library_miss_policy"):
        TierConfig(gpu_budget="1GiB", miss_policy="maybe")


@pytest.mark.parametrize("prefetch", ["next_layer", "none"])
def test_next_layer_prefetch_fetches_layer_l_chunks_for_l_plus_1(full, prefetch):
    from moska.library import load_library

    lib = full.engine.libraries.get("docs")
    cfg = TierConfig(gpu_budget=_slot_budget(lib, 3), prefetch=prefetch)
    tiers = load_library(full.engine.libraries.root, "docs", None, "cpu", progress=False,
                         tiers=cfg).tiers  # fmt: skip
    hkv, d = lib.k_pools[0].shape[1:]
    q = torch.randn(2, 4, d, generator=torch.Generator().manual_seed(2))
    sel = from_topk(torch.tensor([[[0, 3]], [[3, 4]]]), hkv, lib.num_chunks)
    ops = full.engine.runner.ops
    tiers.attend(ops, 0, q, sel, 0.25)
    ahead = prefetch == "next_layer"
    assert (tiers.resident(1) == {0, 3, 4}) is ahead and tiers.stats.prefetched == 3 * ahead
    misses = tiers.stats.misses["gpu"]
    o, lse, _ = tiers.attend(ops, 1, q, sel, 0.25)
    assert tiers.stats.misses["gpu"] - misses == 3 * (not ahead)
    o_ref, lse_ref = grouped_shared_attention_ref(
        q, lib.k_pools[1], lib.v_pools[1], lib.chunk_offsets, sel, 0.25
    )
    assert torch.allclose(o.float(), o_ref, atol=1e-5) and torch.allclose(lse, lse_ref, atol=1e-5)
