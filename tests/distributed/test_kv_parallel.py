"""KV-parallel attention (DistAttention, Helix) on 3 gloo processes, one spawn for all cases.

Each request's KV is placed over the ranks with a small per-rank block budget, so the long
one cannot fit on one rank; every result is compared with paged attention on one rank
holding everything (fp32, relative error < 1e-4).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from gloo_ranks import run_ranks

from moska.distributed.kv_parallel import KVBudgetError, place_blocks

WORLD = 3
HQ, HKV, D, BS = 6, 2, 16, 4
LENS = [5, 37, 13, 1]  # tokens per request; 37 needs 10 blocks
DEV = torch.device(os.environ.get("MOSKA_TEST_DEVICE", "cpu"))  # cuda: a logic run on a GPU
CAPACITY = 9  # blocks per rank: the 37-token request (10 blocks) cannot fit on one rank


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _kv(lens, seed):
    g = torch.Generator().manual_seed(seed)
    k = [torch.randn(n, HKV, D, generator=g) for n in lens]
    v = [torch.randn(n, HKV, D, generator=g) for n in lens]
    return k, v, g


def _place(lens, ranks, policy):
    free, places = [CAPACITY] * ranks, []
    for n in lens:
        pl = place_blocks(math.ceil(n / BS), free, policy)
        for r in pl.owners:
            free[r] -= 1
        places.append(pl)
    return places


def _cache(k, v, blocks_per_request):
    """A paged cache holding, for each request, the given logical blocks in order; returns
    (k_cache, v_cache, physical ids per request)."""
    total = sum(len(b) for b in blocks_per_request)
    kc = torch.zeros(max(1, total), BS, HKV, D, device=DEV)
    vc = torch.zeros_like(kc)
    phys, nxt = [], 0
    for kb, vb, blocks in zip(k, v, blocks_per_request):
        ids = []
        for i in blocks:
            rows = slice(i * BS, min((i + 1) * BS, kb.shape[0]))
            n = rows.stop - rows.start
            kc[nxt, :n], vc[nxt, :n] = kb[rows], vb[rows]
            ids.append(nxt)
            nxt += 1
        phys.append(ids)
    return kc, vc, phys


def _table(rows_ids):
    width = max(1, max(len(r) for r in rows_ids))
    return torch.tensor(
        [r + [0] * (width - len(r)) for r in rows_ids], dtype=torch.int32, device=DEV
    )


def _cases(rank: int, world: int):
    import torch.distributed as dist

    from moska.distributed.kv_parallel import (
        helix_attention,
        kv_parallel_attention,
        visible_lens,
    )
    from moska.kernel_ops import kernel_ops
    from moska.kernels.paged_attention import paged_attention_ref

    ops = kernel_ops("triton" if DEV.type == "cuda" else "torch")
    scale = D**-0.5
    pair = dist.new_group([0, 1])  # every rank must create it
    out = {}
    for case, (policy, ranks, group) in enumerate(
        (p, r, grp) for p in ("fill", "round_robin") for r, grp in ((world, None), (2, pair))
    ):
        if rank >= ranks:
            continue
        name = f"{policy} {ranks} ranks"
        k, v, g = _kv(LENS, seed=case)
        places = _place(LENS, ranks, policy)
        kc, vc, phys = _cache(k, v, [pl.blocks_of(rank) for pl in places])
        # one rank holding everything: the reference
        kg, vg, pg = _cache(k, v, [range(math.ceil(n / BS)) for n in LENS])
        seq = torch.tensor(LENS, dtype=torch.int32, device=DEV)

        # decode: one row per request at its last position
        q = torch.randn(len(LENS), HQ, D, generator=g).to(DEV)
        vis = torch.cat(
            [visible_lens(pl, rank, BS, n, torch.tensor([n - 1])) for pl, n in zip(places, LENS)]
        ).to(DEV)
        cu = torch.arange(len(LENS) + 1, dtype=torch.int32, device=DEV)
        ref, ref_lse = paged_attention_ref(q, kg, vg, _table(pg), cu, seq, scale)
        o, lse = kv_parallel_attention(q, kc, vc, _table(phys), vis, scale, ops, group)
        res = {
            "decode": _rel(o, ref),
            "decode_lse": _rel(lse, ref_lse),
            "spans": len(set(places[1].owners)),
            "local_blocks": sum(len(p) for p in phys),
        }
        hs = HQ // ranks
        heads = slice(rank * hs, (rank + 1) * hs)
        for mb in (1, 3):
            o_h, lse_h = helix_attention(
                q, kc, vc, _table(phys), vis, scale, ops, group, microbatches=mb
            )
            res[f"helix mb={mb}"] = max(_rel(o_h, ref[:, heads]), _rel(lse_h, ref_lse[:, heads]))
        # the tensor-parallel layout after Helix: a row-parallel o-projection over the
        # head slice plus an all-reduce equals the whole projection
        w = torch.randn(8, HQ * D, generator=g).to(DEV)
        part = o_h.reshape(len(LENS), hs * D) @ w[:, rank * hs * D : (rank + 1) * hs * D].T
        dist.all_reduce(part, group=group)
        res["o_proj"] = _rel(part, ref.reshape(len(LENS), HQ * D) @ w.T)

        # prefill: the last 7 tokens of the long request, causal over all its KV
        b, n = 1, LENS[1]
        pos = torch.arange(n - 7, n)
        qp = torch.randn(7, HQ, D, generator=g).to(DEV)
        vis_p = visible_lens(places[b], rank, BS, n, pos).to(DEV)
        tab_p = _table([phys[b]] * 7)
        ref_p, _ = paged_attention_ref(
            qp, kg, vg, _table([pg[b]]), torch.tensor([0, 7], dtype=torch.int32, device=DEV),
            torch.tensor([n], dtype=torch.int32, device=DEV), scale,
        )  # fmt: skip
        o_p, _ = kv_parallel_attention(qp, kc, vc, tab_p, vis_p, scale, ops, group)
        res["prefill"] = _rel(o_p, ref_p)
        out[name] = res
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_cases, WORLD, timeout_s=90)


NAMES = [f"{p} {r} ranks" for p in ("fill", "round_robin") for r in (WORLD, 2)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", NAMES)
def test_exact_against_one_rank(results, name):
    ranks = int(name.split()[1])
    for rank in range(ranks):
        res = results[rank][name]
        for key in ("decode", "decode_lse", "helix mb=1", "helix mb=3", "o_proj", "prefill"):
            assert res[key] < 1e-4, (name, rank, key, res)


def test_long_request_spans_ranks(results):
    # 10 blocks with 9 per rank: the long request is served from more than one rank, and
    # no rank holds more blocks than its budget
    for name in NAMES:
        ranks = int(name.split()[1])
        for rank in range(ranks):
            assert results[rank][name]["spans"] >= 2
            assert results[rank][name]["local_blocks"] <= CAPACITY


def test_place_blocks_budget_and_prefix():
    with pytest.raises(KVBudgetError, match="needs 13 KV blocks"):
        place_blocks(13, [6, 6])
    for policy in ("fill", "round_robin"):
        longer = place_blocks(9, [3, 5, 2], policy).owners
        for n in range(9):
            assert place_blocks(n, [3, 5, 2], policy).owners == longer[:n]  # prefix-stable
        counts = [longer.count(r) for r in range(3)]
        assert counts[0] <= 3 and counts[1] <= 5 and counts[2] <= 2
    assert place_blocks(4, [2, 2], "fill").owners == (0, 0, 1, 1)
    assert place_blocks(4, [2, 2], "round_robin").owners == (0, 1, 0, 1)
