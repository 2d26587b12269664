"""The study's scorer variants (moska.bench.fidelity_variants) against loop references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from types import SimpleNamespace

import torch

import moska.routing as routing_pkg
from moska.bench import fidelity_hook
from moska.bench import fidelity_variants as fv
from moska.kernels.router import build_routing_index, selections_to_lists
from moska.kernels.router_ref import keymax_scores_ref
from moska.routing import RoutingPolicy


def _case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, G, D, C = 4, 2, 3, 16, 5
    lens = torch.randint(1, 9, (C,), generator=gen)
    offs = torch.tensor([0, *lens.cumsum(0).tolist()], dtype=torch.int32)
    keys = torch.randn(int(offs[-1]), Hkv, D, generator=gen)
    q = torch.randn(B, Hkv * G, D, generator=gen)
    return q, keys, offs


def _loop(q, keys, offs, sm, heads):
    B, Hq, _ = q.shape
    Hkv = keys.shape[1]
    G = Hq // Hkv
    o = offs.tolist()
    out = torch.empty(B, Hkv, len(o) - 1)
    for b in range(B):
        for h in range(Hkv):
            for c in range(len(o) - 1):
                per_q = torch.stack(
                    [(keys[o[c] : o[c + 1], h] @ q[b, h * G + g]).max() * sm for g in range(G)]
                )
                out[b, h, c] = per_q.max() if heads == "max" else torch.logsumexp(per_q, 0)
    return out


def test_head_scores_equal_loops_and_the_keymax_reference():
    q, keys, offs = _case()
    sm = 0.25
    for heads in ("max", "lse"):
        got = fv.head_scores(q, keys, None, offs, sm, heads)
        assert torch.allclose(got, _loop(q, keys, offs, sm, heads), rtol=1e-4, atol=1e-5)
    index = build_routing_index(keys, offs, 8)
    low = fv.head_scores(q, index.lowrank_keys, index.basis, offs, sm, "max")
    ref = keymax_scores_ref(q, index.basis, index.lowrank_keys, offs) * sm
    assert torch.allclose(low, ref, rtol=1e-4, atol=1e-5)


def test_registered_policies_route_by_their_scorer_and_others_defer(monkeypatch):
    monkeypatch.setattr(routing_pkg, "select_chunks", routing_pkg.select_chunks)  # restored
    monkeypatch.setattr(fidelity_hook, "next_select", fidelity_hook.next_select)
    q, keys, offs = _case(1)
    index = build_routing_index(keys, offs, 16)
    lib = SimpleNamespace(num_chunks=5, routing=[index], k_pools=[keys], mode="prefix")
    pols = fv.variant_policies()
    assert routing_pkg.select_chunks is fidelity_hook.study_select
    sm, k = 0.3, 2
    for name, (kind, heads) in fv.VARIANTS.items():
        sel = routing_pkg.select_chunks(q, lib, 0, k, pols[name], sm, use_triton=False)
        truth = _loop(q, keys, offs, sm, heads) if kind == "full" else None
        if truth is None:
            truth = fv.head_scores(q, index.lowrank_keys, index.basis, offs, sm, heads)
        want = truth.topk(k, dim=-1).indices
        got = selections_to_lists(sel, q.shape[0], 2)
        for b in range(q.shape[0]):
            for h in range(2):
                assert sorted(got[b][h]) == sorted(want[b, h].tolist())
    # an unregistered policy (the default itself) goes to the engine's router unchanged
    plain = routing_pkg.select_chunks(q, lib, 0, k, RoutingPolicy(), sm, use_triton=False)
    direct = fidelity_hook.next_select(q, lib, 0, k, RoutingPolicy(), sm, use_triton=False)
    assert torch.equal(plain.chunk, direct.chunk) and torch.equal(plain.req, direct.req)
