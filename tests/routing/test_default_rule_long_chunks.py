"""The default routing rule (per-KV-head key-max top-k, every layer) against a plain loop on
chunks longer than the key-max kernel's key block (64), the shape of the retrieval fidelity
study (256-token chunks): the kernel's unmasked full-block loop runs, which the policy
tests' 3-20-key chunks never reach. fp16 low-rank keys (what half-precision pools get) too,
and a capped (persistent) grid as the engine launches on CUDA."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from types import SimpleNamespace

import pytest
import torch

from moska.kernels.router import build_routing_index
from moska.routing import RoutingPolicy, select_chunks


def library(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = [130, 64, 200, 97, 160, 71]  # full 64-key blocks, and partial tails
    offs = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    k = (3 * torch.randn(int(offs[-1]), 2, 32, generator=gen)).to(dtype)
    index = build_routing_index(k, offs, rank=16)
    return SimpleNamespace(
        routing=[index], k_pools=[k], chunk_offsets=offs, num_chunks=len(lens), mode="prefix"
    )


def chosen_ref(q, index, top_k):
    """Per (row, KV head): the top_k chunks by the largest low-rank logit over the head's
    query heads and the chunk's keys, and each chunk's score; one chunk at a time."""
    B, Hq, _ = q.shape
    Hkv = index.num_kv_heads
    G = Hq // Hkv
    offs = index.chunk_offsets.tolist()
    scores = torch.empty(B, Hkv, len(offs) - 1)
    for h in range(Hkv):
        qr = q[:, h * G : (h + 1) * G].float() @ index.basis[h].float()  # [B, G, R]
        for c in range(len(offs) - 1):
            keys = index.lowrank_keys[offs[c] : offs[c + 1], h].float()  # [L, R]
            scores[:, h, c] = (qr @ keys.T).amax(dim=(1, 2))
    return scores.topk(top_k, dim=-1).indices.sort(-1).values, scores


def chosen(sel, B, Hkv):
    sets = [[[] for _ in range(Hkv)] for _ in range(B)]
    for b, h, c in zip(sel.req.tolist(), sel.kv_head.tolist(), sel.chunk.tolist()):
        sets[b][h].append(c)
    return torch.tensor([[sorted(x) for x in per_b] for per_b in sets])


@pytest.mark.parametrize(("dtype", "programs"), [(torch.float32, None), (torch.float16, 3)])
def test_default_policy_picks_the_reference_chunks_on_long_chunks(dtype, programs):
    lib = library(dtype)
    index = lib.routing[0]
    assert index.lowrank_keys.dtype == dtype  # fp16 pools: fp16 low-rank keys, fp16 logits
    q = (2 * torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(1))).to(dtype)
    top_k = 2
    policy = RoutingPolicy()
    assert policy.per_kv_head and policy.scorer == "keymax" and policy.dense_layers == 0
    sel = select_chunks(q, lib, 0, top_k, policy, 0.2, use_triton=True, keymax_programs=programs)
    got = chosen(sel, 3, 2)
    want, scores = chosen_ref(q, index, top_k)
    assert got.shape == want.shape == (3, 2, top_k)
    if dtype == torch.float32:
        assert torch.equal(got, want)
        return
    # fp16 logits: a row may swap chunks whose scores are within fp16 rounding; the chunks
    # the kernel took must score within that of the reference's k-th best
    kth = scores.topk(top_k, dim=-1).values[..., -1:]
    took = scores.gather(-1, got)
    tol = 1e-2 * scores.abs().amax(dim=-1, keepdim=True)
    assert bool((took >= kth - tol).all())
    assert (got == want).all(-1).float().mean() >= 0.8  # not a coin flip
