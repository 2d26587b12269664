"""Routing policy: each rule against a plain loop reference on small random shapes."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math
from types import SimpleNamespace

import pytest
import torch

from moska.kernels.router import SCORERS, build_routing_index, route
from moska.kernels.selections import from_topk_ref
from moska.routing import (
    LEGACY,
    RoutingPolicy,
    RoutingPolicyError,
    always_chunks,
    choose,
    from_mask,
    select_chunks,
)
from moska.routing.policy import SCORERS as POLICY_SCORERS
from moska.routing.select import oracle_log_mass, page_log_mass


def triples(sel) -> list[tuple[int, int, int]]:
    return list(zip(sel.chunk.tolist(), sel.kv_head.tolist(), sel.req.tolist()))


def fake_library(C=9, Hkv=2, D=16, seed=0, mode="prefix", rank=None):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 20, (C,), generator=gen)
    offs = torch.tensor([0, *lens.cumsum(0).tolist()], dtype=torch.int32)
    k = torch.randn(int(offs[-1]), Hkv, D, generator=gen)
    index = build_routing_index(k, offs, rank)
    return SimpleNamespace(
        routing=[index, index], k_pools=[k, k], chunk_offsets=offs, num_chunks=C, mode=mode
    )


def choose_ref(logmass, top_k, always, per_kv_head, threshold):
    """One row at a time, in plain Python."""
    C = logmass.shape[2]
    share = torch.softmax(logmass, dim=-1)
    if not per_kv_head:
        share = share.mean(dim=1, keepdim=True)
    out = torch.zeros(share.shape, dtype=torch.bool)
    for b in range(share.shape[0]):
        for h in range(share.shape[1]):
            p = share[b, h].tolist()
            order = list(always) + sorted(
                (c for c in range(C) if c not in always), key=lambda c: -p[c]
            )
            take, acc = [], 0.0
            for c in order:
                if len(take) >= top_k:
                    break
                if threshold is not None and acc >= threshold and len(take) >= max(1, len(always)):
                    break
                take.append(c)
                acc += p[c]
            out[b, h, take] = True
    return out


@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("threshold", [None, 0.5, 0.9])
@pytest.mark.parametrize("always", [[], [0], [8, 0]])
def test_choose_matches_loop_reference(per_kv_head, threshold, always):
    gen = torch.Generator().manual_seed(len(always) + int((threshold or 0) * 10))
    logmass = 3 * torch.randn(5, 2, 9, generator=gen)
    got = choose(logmass, 4, always, per_kv_head, threshold)
    want = choose_ref(logmass, 4, always, per_kv_head, threshold)
    assert torch.equal(got, want)
    for c in always:  # the always-attended rule
        assert bool(got[..., c].all())
    counts = got.sum(-1)
    assert int(counts.max()) <= 4 and int(counts.min()) >= 1
    if threshold is None:
        assert bool((counts == 4).all())


def test_adaptive_k_takes_fewer_chunks_when_mass_is_concentrated():
    peaked = torch.full((1, 1, 8), -20.0)
    peaked[0, 0, 5] = 0.0
    flat = torch.zeros(1, 1, 8)
    assert choose(peaked, 6, [], False, 0.9).sum() == 1
    assert choose(flat, 6, [], False, 0.9).sum() == 6  # capped by top_k


def test_from_mask_equals_sorted_reference():
    gen = torch.Generator().manual_seed(3)
    B, Hkv, C, K = 4, 2, 7, 3
    idx = torch.stack([torch.randperm(C, generator=gen)[:K] for _ in range(B * Hkv)])
    idx = idx.view(B, Hkv, K)
    mask = torch.zeros(B, Hkv, C, dtype=torch.bool).scatter(-1, idx, True)
    assert triples(from_mask(mask, Hkv)) == triples(from_topk_ref(idx, Hkv))
    shared = mask[:, :1]  # one set per request, every head
    assert triples(from_mask(shared, Hkv)) == triples(from_topk_ref(idx[:, :1], Hkv))


def test_fixed_policy_equals_route_and_dense_layers_read_everything():
    lib = fake_library()
    q = torch.randn(6, 4, 16)
    for scorer in SCORERS:
        pol = LEGACY.replace(scorer=scorer)
        got = select_chunks(q, lib, 1, 3, pol, 0.25, use_triton=False)
        want = route(q, lib.routing[1], 3, scorer=scorer, use_triton=False)
        assert triples(got) == triples(want)
    dense = RoutingPolicy(dense_layers=1)
    every = select_chunks(q, lib, 0, 3, dense, 0.25, use_triton=False)
    assert len(triples(every)) == 6 * 2 * lib.num_chunks
    routed = select_chunks(q, lib, 1, 3, dense, 0.25, use_triton=False)
    assert len(triples(routed)) == 6 * 2 * 3


def test_always_chunks_rule():
    pol = RoutingPolicy(always_first=True, always_last=True)
    assert always_chunks(pol, 10, "prefix", 8) == [9, 0]
    assert always_chunks(pol, 10, "independent", 8) == [0]  # no chunk is nearest
    assert always_chunks(pol, 10, "prefix", 1) == [9]  # trimmed to k, nearest first
    lib = fake_library()
    q = torch.randn(5, 4, 16)
    for extra in ({}, {"mass_threshold": 0.5}, {"page_size": 4}):
        sel = select_chunks(q, lib, 1, 3, pol.replace(**extra), 0.25, use_triton=False)
        per_req = {}
        for c, _, b in triples(sel):
            per_req.setdefault(b, set()).add(c)
        assert all({0, lib.num_chunks - 1} <= s for s in per_req.values())


def test_page_log_mass_matches_loop_reference():
    lib = fake_library(rank=16)  # full rank: low-rank keys are the keys in the PCA basis
    index = lib.routing[0]
    q = torch.randn(3, 4, 16)
    got = page_log_mass(q, index, 4, 0.5, use_triton=False)
    offs = index.chunk_offsets.tolist()
    qr = torch.einsum("bhgd,hdr->bhgr", q.view(3, 2, 2, 16), index.basis.float())
    for c in range(len(offs) - 1):
        for h in range(2):
            pages = []
            for s in range(offs[c], offs[c + 1], 4):
                keys = index.lowrank_keys[s : min(s + 4, offs[c + 1]), h].float()
                pages.append(0.5 * (qr[:, h] @ keys.T).amax(dim=(1, 2)))  # [B]
            want = torch.logsumexp(torch.stack(pages, -1), -1)
            assert torch.allclose(got[:, h, c], want, rtol=1e-4, atol=1e-4)


def test_oracle_log_mass_matches_reference():
    lib = fake_library()
    q = torch.randn(3, 4, 16)
    got = oracle_log_mass(q, lib.k_pools[0], lib.chunk_offsets, 0.3)
    offs = lib.chunk_offsets.tolist()
    k = lib.k_pools[0]
    for c in range(len(offs) - 1):
        for h in range(2):
            logits = 0.3 * torch.einsum(
                "bgd,sd->bgs", q[:, 2 * h : 2 * h + 2], k[offs[c] : offs[c + 1], h]
            )
            want = torch.logsumexp(logits.flatten(1), -1)
            assert torch.allclose(got[:, h, c], want, rtol=1e-4, atol=1e-4)


def test_policy_validation_and_config_surfaces():
    from moska.config import EngineConfig
    from moska.engine.sampling_params import SamplingParams, SamplingParamsError

    assert POLICY_SCORERS == SCORERS
    with pytest.raises(RoutingPolicyError) as e:
        RoutingPolicy(scorer="nope")
    assert e.value.param == "scorer"
    with pytest.raises(RoutingPolicyError):
        RoutingPolicy(mass_threshold=1.5)
    with pytest.raises(RoutingPolicyError):
        RoutingPolicy(scorer="mean", page_size=64)
    with pytest.raises(RoutingPolicyError) as e:
        RoutingPolicy.from_dict({"top_k": 3})
    assert e.value.param == "top_k"
    sp = SamplingParams(routing={"scorer": "two_stage", "mass_threshold": 0.9})
    assert sp.routing == RoutingPolicy(scorer="two_stage", mass_threshold=0.9)
    assert not sp.routing.graph_safe and RoutingPolicy().graph_safe
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(routing={"dense_layers": -1})
    assert e.value.param == "routing.dense_layers"
    cfg = EngineConfig(routing_scorer="mean", routing_mass_threshold=0.0, routing_page_size=0)
    assert cfg.routing_policy == RoutingPolicy(scorer="mean")
    assert EngineConfig(routing_mass_threshold=0.8).routing_policy.mass_threshold == 0.8
    with pytest.raises(ValueError):
        EngineConfig(routing_scorer="nope")
    assert math.isfinite(RoutingPolicy().shortlist_factor)


def test_default_chunk_size_gives_about_32_chunks_within_bounds():
    from moska.routing.policy import default_chunk_size

    for n in (100, 3000, 4096, 50_000, 10**6, 10**8):
        size = default_chunk_size(n)
        assert 64 <= size <= 4096 and size & (size - 1) == 0
        if 64 * 32 <= n <= 4096 * 32:
            assert 16 <= n / size <= 64  # within a factor two of 32 chunks
