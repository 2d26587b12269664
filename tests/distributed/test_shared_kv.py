"""Shared-KV ranks on 4 gloo processes: every case runs inside one spawn (module fixture).

Exactness: at top_k = all against dense attention over (library ++ the row's own KV) in one
process; at top_k < all against the single-process routed path (route, grouped attention,
merge_selections). fp32, relative error < 1e-4. Cases cover 1 + 3 and 2 + 2 and 3 + 1
layouts, chunk counts that do not divide by the shared ranks, a shared rank that holds no
chunk, one that no row selects, a unique rank with no rows, replicated hot chunks, and
several layers served by ``serve_forever`` until ``stop``.
"""

from __future__ import annotations

import os

import pytest
import torch
from gloo_ranks import run_ranks

WORLD = 4
HQ, HKV, D = 4, 2, 16
CASES = {
    # name: (unique ranks, chunks, top_k or None for all, rows per unique rank, options)
    "1+3 all chunks, 7 chunks": (1, 7, None, [5], {}),
    "1+3 top-2 routed": (1, 7, 2, [6], {}),
    "1+3 two chunks (a rank holds none)": (1, 2, None, [3], {}),
    "1+3 rank 2 selected by no row": (1, 7, 2, [4], {"chunks": [0, 4]}),
    "2+2 top-3, second unique rank empty": (2, 5, 3, [5, 0], {}),
    "2+2 all chunks": (2, 5, None, [3, 4], {}),
    "3+1 top-1": (3, 4, 1, [2, 3, 1], {}),
    "1+3 replicated hot chunks": (1, 7, 3, [8], {"replicas": 2}),
    # the unique ranks form a tensor-parallel group: the same rows, each its query heads
    "2+2 tensor-parallel heads, top-2": (2, 5, 2, [5, 5], {"tp": ((0, 2), (2, 4))}),
    "2+2 tensor-parallel heads, all chunks": (2, 5, None, [4, 4], {"tp": ((0, 2), (2, 4))}),
    # 3 ranks over 2 KV heads: KV head 0's query heads split over ranks 0 and 1
    "3+1 tensor-parallel, a KV head split": (3, 4, 2, [3, 3, 3], {"tp": ((0, 1), (1, 2), (2, 4))}),
}
LAYERS = 2


def _data(num_chunks: int, rows: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 9, (num_chunks,), generator=g)
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    s = int(offs[-1])
    k = [torch.randn(s, HKV, D, generator=g) for _ in range(LAYERS)]
    v = [torch.randn(s, HKV, D, generator=g) for _ in range(LAYERS)]
    q = [[torch.randn(b, HQ, D, generator=g) for b in rows] for _ in range(LAYERS)]
    # each row's own KV, dense: [rows, L_u, Hkv, D] with per-row lengths
    uniq = []
    for b in rows:
        ln = torch.randint(1, 7, (b,), generator=g)
        uniq.append(
            (
                ln,
                [torch.randn(LAYERS, int(n), HKV, D, generator=g) for n in ln],
                [torch.randn(LAYERS, int(n), HKV, D, generator=g) for n in ln],
            )
        )
    return offs, k, v, q, uniq


def _to(x, dev):
    if isinstance(x, torch.Tensor):
        return x.to(dev)
    return type(x)(_to(y, dev) for y in x)


def _dense(q, keys, vals, scale):
    """q [Hq, D], keys/vals [L, Hkv, D] -> (o [Hq, D], lse [Hq])."""
    kk = keys.repeat_interleave(HQ // HKV, 1)  # [L, Hq, D]
    s = torch.einsum("hd,lhd->hl", q.double(), kk.double()) * scale
    o = torch.einsum(
        "hl,lhd->hd", torch.softmax(s, -1), vals.repeat_interleave(HQ // HKV, 1).double()
    )
    return o, torch.logsumexp(s, -1)


def _cases(rank: int, world: int):
    import torch.distributed as dist

    from moska.distributed.partition import ChunkPlacement
    from moska.distributed.shared_kv import (
        SharedKVClient,
        SharedKVLayout,
        SharedKVServer,
        SharedKVSpec,
        shard_library,
    )
    from moska.kernel_ops import kernel_ops
    from moska.kernels.router import build_routing_index, route
    from moska.kernels.selections import Selections, from_topk

    dev = torch.device(os.environ.get("MOSKA_TEST_DEVICE", "cpu"))
    ops = kernel_ops("triton" if dev.type == "cuda" else "torch")
    scale = D**-0.5
    spec = SharedKVSpec(HQ, HKV, D, torch.float32, scale)
    out = {}
    for i, (name, (u, nc, top_k, rows, opt)) in enumerate(CASES.items()):
        tp = opt.get("tp", ())
        lay = SharedKVLayout(u, world - u, tp)
        offs, k, v, q, uniq = _to(_data(nc, rows, seed=i), dev)
        placement = ChunkPlacement.by_chunk_id(nc, lay.num_shared)
        if "replicas" in opt:
            hot = [10.0 / (c + 1) for c in range(nc)]  # Zipf-like: chunk 0 hottest
            placement = placement.with_replicas(hot, opt["replicas"])
        if lay.is_shared(rank):
            shard = shard_library(k, v, offs, placement, lay.shared_index(rank))
            server = SharedKVServer(spec, lay, shard, ops)
            served = server.serve_forever()
            out[name] = {"served": served, "loads": server.loads, "chunks": shard.chunks}
            continue
        # a tensor-parallel rank: query heads [h0, h1) of rank 0's rows, KV heads [k0, k1)
        h0, h1 = lay.heads_of(rank, HQ)
        g = HQ // HKV
        k0, k1 = h0 // g, -(-h1 // g)
        mine = SharedKVSpec(h1 - h0, k1 - k0, D, torch.float32, scale)
        client = SharedKVClient(mine, lay, placement, ops, kv_offset=k0)
        src = 0 if tp else rank
        errs, b = [], rows[src]
        _, ku, vu = uniq[src]
        for layer in range(LAYERS):
            qr = q[layer][src]
            # the unique part: dense over each row's own KV
            o_u = torch.zeros(b, HQ, D, device=dev)
            lse_u = torch.zeros(b, HQ, device=dev)
            for r in range(b):
                o_r, l_r = _dense(qr[r], ku[r][layer], vu[r][layer], scale)
                o_u[r], lse_u[r] = o_r.float(), l_r.float()
            index = build_routing_index(k[layer], offs)
            if "chunks" in opt:
                pick = torch.tensor(opt["chunks"], device=dev)  # every row reads these
                sel = from_topk(pick.expand(b, 1, top_k), HKV, nc)
            else:
                sel = route(qr, index, nc if top_k is None else top_k)
            keep = (sel.kv_head >= k0) & (sel.kv_head < k1)  # this rank's KV heads, local
            local = Selections(sel.req[keep], sel.kv_head[keep] - k0, sel.chunk[keep])
            q_mine = qr[:, h0:h1].contiguous()
            o, lse = client.attend(layer, q_mine, o_u[:, h0:h1], lse_u[:, h0:h1], local)
            if top_k is None:  # dense over library ++ own KV
                ref = (
                    torch.stack(
                        [
                            _dense(
                                qr[r],
                                torch.cat([k[layer], ku[r][layer]]),
                                torch.cat([v[layer], vu[r][layer]]),
                                scale,
                            )[0]
                            for r in range(b)
                        ]
                    )
                    if b
                    else torch.zeros(0, HQ, D)
                )
            else:  # the single-process routed path
                o_s, l_s = ops.grouped_shared(qr, k[layer], v[layer], offs, sel, scale)
                ref, _ = ops.merge_selections(o_u, lse_u, o_s, l_s, sel)
            ref = ref[:, h0:h1]
            err = float((o.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
            errs.append(err if b else 0.0)
            errs.append(bool(torch.isfinite(lse).all()))
        client.stop()
        out[name] = {"errs": errs, "rows": b}
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_cases, WORLD, timeout_s=90)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(CASES))
def test_exact_against_one_process(results, name):
    u = CASES[name][0]
    for rank in range(u):
        errs = results[rank][name]["errs"]
        for layer in range(LAYERS):
            assert errs[2 * layer] < 1e-4, (name, rank, layer, errs)
            assert errs[2 * layer + 1] is True, "lse not finite"
    for rank in range(u, WORLD):
        assert results[rank][name]["served"] == LAYERS  # every layer, then the stop


def test_rank_without_chunks_and_without_selections(results):
    # 2 chunks over 3 shared ranks: the third holds none and receives nothing
    r = results[3]["1+3 two chunks (a rank holds none)"]
    assert r["chunks"] == ()
    assert all(rows == 0 for _, rows, _ in r["loads"])
    # chunks 0 and 4 are on shared ranks 0 and 1 (c % 3): shared rank 2 (group rank 3)
    # gets no query row although it holds chunks 2 and 5
    r = results[3]["1+3 rank 2 selected by no row"]
    assert r["chunks"] == (2, 5)
    assert all(rows == 0 for _, rows, _ in r["loads"])
    for rank in (1, 2):
        busy = results[rank]["1+3 rank 2 selected by no row"]["loads"]
        assert all(rows == CASES["1+3 rank 2 selected by no row"][3][0] for _, rows, _ in busy)


def test_all_chunks_load(results):
    # top_k = all: every shared rank gets every row once, and one selection per held
    # (chunk, kv head, row)
    name = "1+3 all chunks, 7 chunks"
    rows = CASES[name][3][0]
    for rank in range(1, WORLD):
        r = results[rank][name]
        for _, got_rows, sels in r["loads"]:
            assert got_rows == rows
            assert sels == len(r["chunks"]) * HKV * rows


def test_replicas_hold_the_hot_chunk(results):
    name = "1+3 replicated hot chunks"
    holders = [rank for rank in range(1, WORLD) if 0 in results[rank][name]["chunks"]]
    assert len(holders) >= 2, holders


def test_placement_by_chunk_id_and_errors():
    from moska.distributed.partition import ChunkPlacement, PlacementError

    p = ChunkPlacement.by_chunk_id(7, 3)
    assert [p.chunks_of(r) for r in range(3)] == [(0, 3, 6), (1, 4), (2, 5)]
    with pytest.raises(PlacementError, match="distinct ranks"):
        ChunkPlacement(2, 2, ((0,), (0, 0)))
    with pytest.raises(PlacementError, match="chunk_load has 3 entries"):
        p.with_replicas([1.0, 2.0, 3.0], 1)


def test_replicas_spread_readers_and_lower_zipf_imbalance():
    from moska.bench.shared_kv_load import load_report
    from moska.distributed.partition import ChunkPlacement, destinations
    from moska.kernels.selections import from_topk

    # chunk 0 on all three ranks: its 9 readers are dealt 3 + 3 + 3, each row's KV heads
    # to one rank
    p = ChunkPlacement(3, 3, ((0, 1, 2), (1,), (2,)))
    sel = from_topk(torch.zeros(9, 1, 1, dtype=torch.int64), 2, 3)
    d = destinations(sel, 9, p)
    assert torch.bincount(d.rank, minlength=3).tolist() == [6, 6, 6]
    assert d.pairs.numel() == 9
    r = load_report(num_chunks=16, num_ranks=3, batch=32, top_k=4, num_kv_heads=2, steps=4)
    assert r["replicas"], r
    assert r["replicated"]["imbalance_mean_step"] < r["by_id"]["imbalance_mean_step"]
    assert sum(r["replicated"]["selections_per_rank_per_step"]) == pytest.approx(
        sum(r["by_id"]["selections_per_rank_per_step"])
    )
