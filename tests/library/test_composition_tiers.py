"""A composition with a tiered part (its GPU budget smaller than the library) is served in the
resident parts' one grouped launch: the tiered library's GPU slots are rows of the engine's
arena, and its routed chunks are fetched into them before the launch.

Launch counts (grouped_shared calls, and Triton launches in the interpreter) before (a
launch per part: the per-part path, still taken by adaptive k) and now; exactness at
top_k = all against plain PyTorch over the whole library; a composed request through the
engine equal to an engine holding both libraries whole."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from test_composition import counting

from moska.attention.composed import composed_group_states
from moska.attention.metadata import LibraryGroup
from moska.engine.sampling_params import SamplingParams
from moska.kernel_ops import kernel_ops
from moska.library.composition import ComposedLibrary
from moska.routing import RoutingPolicy

DOC_BIG = "".join(chr(97 + (i * 11) % 26) for i in range(100))  # fresh, non-repeating
DOC_SMALL = "def g(y):\n    return y * 3\n"
SLOTS = 3  # the tiered library's GPU slots per layer


def per_chunk_bytes(lib) -> int:
    k, offs = lib.k_pools[0], lib.chunk_offsets.tolist()
    rows = max(b - a for a, b in itertools.pairwise(offs))
    return 2 * rows * k.shape[1] * k.shape[2] * k.element_size() * lib.num_kv_layers


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(whole, tiered): one engine holding "big" and "small" whole, one over the same store
    under a GPU budget of SLOTS chunks per library ("big" tiered, "small" fits)."""
    from moska.engine.llm_engine import LLMEngine

    root = tmp_path_factory.mktemp("libs")
    kw = {"device": "cpu", "library_root": str(root), "max_model_len": 512, "num_kv_blocks": 64}
    whole = LLMEngine.from_model(None, **kw)
    whole.libraries.build("big", [("b.txt", DOC_BIG)], chunk_size=16, mode="independent")
    whole.libraries.build("small", [("s.py", DOC_SMALL)], chunk_size=16, mode="independent")
    budget = f"{SLOTS * per_chunk_bytes(whole.libraries.get('big'))}B"
    tiered = LLMEngine.from_model(None, **kw, library_gpu_budget=budget, library_cpu_budget="0")
    return whole, tiered


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def reference(q, parts, layer, own_k, own_v, sm_scale):
    """Plain PyTorch: every row attends to every row of every (whole) part and its own keys."""
    G = q.shape[1] // own_k.shape[1]
    ks = [p.k_pools[layer] for p in parts] + [own_k]
    vs = [p.v_pools[layer] for p in parts] + [own_v]
    k = torch.cat(ks).float().repeat_interleave(G, 1)
    v = torch.cat(vs).float().repeat_interleave(G, 1)
    p = torch.softmax(torch.einsum("thd,shd->hts", q.float(), k) * sm_scale, -1)
    return torch.einsum("hts,shd->thd", p, v)


def merged(ops, q, group, layer, own_k, own_v, sm_scale):
    o_sel, lse_sel, sel = composed_group_states(ops, layer, q, group, sm_scale)
    G = q.shape[1] // own_k.shape[1]
    s = torch.einsum("thd,shd->ths", q, own_k.repeat_interleave(G, 1)) * sm_scale
    o_base = torch.einsum("ths,shd->thd", torch.softmax(s, -1), own_v.repeat_interleave(G, 1))
    o, _ = ops.merge_selections(o_base, torch.logsumexp(s, -1), o_sel, lse_sel, sel)
    return o, sel


def test_tiered_slots_are_arena_rows(engines):
    """The tiered library's GPU slots of K and V are a range of the arena that holds the
    resident library: views of its pool tensors, per layer."""
    _, tiered = engines
    libs = tiered.libraries
    big, small = libs.get("big"), libs.get("small")
    assert big.tiers is not None and big.tiers.num_slots == SLOTS < big.num_chunks
    assert small.tiers is None and libs.arena is not None
    assert big.arena_range.arena is small.arena_range.arena is libs.arena
    assert big.arena_range.rows == SLOTS * big.tiers.slot_rows
    for layer in range(big.num_kv_layers):
        row = libs.arena.k_pools[layer][big.arena_range.start]
        assert big.tiers.k_pools[layer].data_ptr() == row.data_ptr()
        assert big.k_pools[layer] is big.tiers.k_pools[layer]


def test_routed_tiered_and_resident_is_one_launch(engines):
    """Fixed k, the routed chunks of the tiered part within its slots: ONE grouped launch per
    layer (was one per part: the per-part path, adaptive k at threshold 1 = k, takes it
    still), the same chunks and output as that path and as both libraries held whole."""
    whole, tiered = engines
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 64, generator=g) * 2
    own_k, own_v = torch.randn(4, 2, 64, generator=g), torch.randn(4, 2, 64, generator=g)
    ops, calls = counting(kernel_ops("torch"))
    outs, picked, counts = [], [], []
    for eng, threshold in ((tiered, None), (tiered, 1.0), (whole, None)):
        comp = ComposedLibrary((eng.libraries.get("small"), eng.libraries.get("big")))
        policy = RoutingPolicy(per_kv_head=False, mass_threshold=threshold)
        for layer in range(comp.num_kv_layers):
            group = LibraryGroup(comp, torch.arange(1), top_k=SLOTS, policy=policy, all_rows=True)
            calls.clear()
            o, sel = merged(ops, q, group, layer, own_k, own_v, 0.125)
            counts.append(len(calls))
            outs.append(o)
            picked.append({(int(h), int(c)) for h, c in zip(sel.kv_head, sel.chunk)})
    n, base = comp.num_kv_layers, comp.bases[1]
    parts_read = [len({c >= base for _, c in p}) for p in picked[n : 2 * n]]
    assert counts == [1] * n + parts_read + [1] * n, counts  # now, before, whole
    assert 2 in parts_read  # a layer that read both libraries: two launches before, one now
    for i in range(n):
        assert picked[i] == picked[n + i] == picked[2 * n + i]
        assert rel_err(outs[i], outs[2 * n + i]) < 1e-5
        assert rel_err(outs[n + i], outs[2 * n + i]) < 1e-5


def test_top_k_all_exact_in_passes(engines):
    """top_k = all: every chunk of the tiered part, SLOTS at a time: the first pass in the
    resident part's launch, each later pass a launch (ceil(C / SLOTS) in all; was one more),
    equal to plain PyTorch over both whole libraries in every layer (fp32)."""
    whole, tiered = engines
    comp = ComposedLibrary((tiered.libraries.get("small"), tiered.libraries.get("big")))
    ref = [whole.libraries.get("small"), whole.libraries.get("big")]
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 64, generator=g)
    own_k, own_v = torch.randn(3, 2, 64, generator=g), torch.randn(3, 2, 64, generator=g)
    ops, calls = counting(kernel_ops("torch"))
    passes = math.ceil(comp.parts[1].num_chunks / SLOTS)
    for layer in range(comp.num_kv_layers):
        group = LibraryGroup(comp, torch.arange(2), top_k=comp.num_chunks, all_rows=True)
        calls.clear()
        o, sel = merged(ops, q, group, layer, own_k, own_v, 0.125)
        assert len(calls) == passes > 1
        assert sel.req.numel() == 2 * 2 * comp.num_chunks
        assert rel_err(o, reference(q, ref, layer, own_k, own_v, 0.125)) < 1e-4


def test_top_k_all_one_launch_when_the_slots_hold_it(engines, launches):
    """A tiered part whose GPU slots (arena rows) hold every chunk, all fetched from disk on
    the first read: top_k = all is ONE grouped Triton launch, exact (one layer: the
    interpreter is slow)."""
    from moska.library.tiered_load import load_tiered

    whole, tiered = engines
    libs = tiered.libraries
    big = whole.libraries.get("big")
    lib = load_tiered(
        libs.root / "big", big.manifest, big.chunk_offsets, big.token_ids, libs.device,
        libs.tiers, big.num_chunks, big.num_chunks * big.num_kv_layers, libs._reserve,
    )  # fmt: skip
    assert lib.arena_range is not None and lib.arena_range.arena is libs.arena
    comp = ComposedLibrary((libs.get("small"), lib))
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 64, generator=g)
    own_k, own_v = torch.randn(3, 2, 64, generator=g), torch.randn(3, 2, 64, generator=g)
    ref, layer = [whole.libraries.get("small"), big], 1
    group = LibraryGroup(comp, torch.arange(1), top_k=comp.num_chunks, all_rows=True)
    launches.clear()
    o, _ = merged(kernel_ops("triton"), q, group, layer, own_k, own_v, 0.125)
    assert launches.count("_grouped_shared_attention_kernel") == 1, launches
    assert rel_err(o, reference(q, ref, layer, own_k, own_v, 0.125)) < 1e-4
    assert lib.tiers.stats.misses["gpu"] == big.num_chunks  # every chunk read from disk


def test_composed_request_equals_whole_libraries(engines):
    """Through the engine, a request over ["small", "big"] ("big" tiered) answers as the
    engine holding both whole does, routed (k = SLOTS) and at top_k = all."""
    whole, tiered = engines
    params = SamplingParams(max_tokens=2, temperature=0.0, logprobs=5)
    for top_k in (SLOTS, whole.libraries.get("big").num_chunks + 1):
        outs = []
        for eng in (whole, tiered):
            eng.add_request("r", "x = g(2)", params, libraries=["small", "big"], top_k_chunks=top_k)
            final = None
            while eng.has_unfinished_requests():
                final = [o for o in eng.step() if o.finished] or final
            outs.append(final[0].outputs[0])
        assert outs[0].token_ids == outs[1].token_ids
        top = outs[0].logprobs[0].top
        assert max(abs(top[t] - outs[1].logprobs[0].top[t]) for t in top) < 1e-4
    assert tiered.libraries.get("big").tiers.stats.misses["gpu"] > 0


def test_skip_policy_drops_absent_chunks_then_reads_them(engines):
    """ "skip" in the one launch: chunks of the tiered part not in its slots are left out of
    this step (counted as skipped) and fetched after the launch; the next step reads them,
    each kept selection's state equal to the same selection over the whole libraries."""
    from moska.attention.composed import global_states
    from moska.library.tier_config import TierConfig
    from moska.library.tiered_load import load_tiered

    whole, tiered = engines
    libs, big = tiered.libraries, whole.libraries.get("big")
    skip = dataclasses.replace(libs.tiers, miss_policy="skip", prefetch="none")
    assert isinstance(skip, TierConfig)
    lib = load_tiered(
        libs.root / "big", big.manifest, big.chunk_offsets, big.token_ids, libs.device, skip,
        SLOTS, SLOTS * big.num_kv_layers, libs._reserve,
    )  # fmt: skip
    comp = ComposedLibrary((libs.get("small"), lib))
    wcomp = ComposedLibrary((whole.libraries.get("small"), big))
    q = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(8)) * 2
    ops, layer = kernel_ops("torch"), 1
    policy = RoutingPolicy(per_kv_head=False)
    reads = []
    for _ in range(2):
        group = LibraryGroup(comp, torch.arange(1), top_k=SLOTS, policy=policy, all_rows=True)
        o_sel, lse_sel, sel = composed_group_states(ops, layer, q, group, 0.125)
        reads.append({int(c) for c in sel.chunk if c >= comp.bases[1]})
        o_ref, lse_ref = global_states(ops, layer, q, wcomp, sel, 0.125)
        assert rel_err(o_sel, o_ref) < 1e-5 and rel_err(lse_sel, lse_ref) < 1e-5
    assert not reads[0] and lib.tiers.stats.skipped > 0  # nothing resident at first
    assert reads[1] and len(reads[1]) <= SLOTS  # fetched after the first launch
