"""Routing a library under tensor parallelism (distributed/tp_library.HeadSplit) on 2 and 3
gloo processes: each rank holds its KV heads of the routing index and its query heads of q,
and picks, for its KV heads, exactly the chunks one process picks over all heads, for every
routing rule (per KV head or summed, each scorer, adaptive k, pages, the oracle, always-read
chunks). With 3 ranks KV head 0 is replicated on ranks 0 and 1 (its query heads split
1 + 1); the oracle and pages, which sum over a head's query heads, are refused there."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from gloo_ranks import run_ranks

HQ, HKV, D, B = 4, 2, 16, 5
POLICIES = {
    "per_head keymax": {},
    "summed keymax": {"per_kv_head": False},
    "summed mean": {"per_kv_head": False, "scorer": "mean"},
    "per_head bound": {"scorer": "bound"},
    "per_head two_stage": {"scorer": "two_stage", "shortlist_factor": 2},
    "summed two_stage": {"scorer": "two_stage", "per_kv_head": False, "shortlist_factor": 2},
    "per_head threshold": {"mass_threshold": 0.6},
    "summed threshold, first": {"mass_threshold": 0.6, "per_kv_head": False, "always_first": True},
    "per_head pages": {"page_size": 3},
    "summed oracle": {"scorer": "oracle", "per_kv_head": False},
}
NEEDS_WHOLE_HEADS = {"per_head pages", "summed oracle"}  # refused with a replicated head
TOP_K = 3


def _library(seed: int):
    from moska.kernels.router import build_routing_index

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(4, 11, (8,), generator=g)
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    k = torch.randn(int(offs[-1]), HKV, D, generator=g)
    q = torch.randn(B, HQ, D, generator=g)
    index = build_routing_index(k, offs, rank=4)
    return SimpleNamespace(routing=[index], k_pools=[k], num_chunks=8, mode="prefix"), q


def _local(lib, q, plan, comm):
    """This rank's library (its KV heads of every per-head part) and q (its query heads)."""
    from moska.distributed.tp_library import HeadSplit
    from moska.kernels.router import RoutingIndex

    lo, hi = plan.kv_heads
    ix = lib.routing[0]
    index = RoutingIndex(ix.chunk_offsets, ix.mean_keys[:, lo:hi], ix.key_min[:, lo:hi],
                         ix.key_max[:, lo:hi], ix.basis[lo:hi], ix.lowrank_keys[:, lo:hi])  # fmt: skip
    split = HeadSplit(lo, hi, HKV, plan.size > HKV, comm)
    local = SimpleNamespace(
        routing=[index], k_pools=[lib.k_pools[0][:, lo:hi]], num_chunks=lib.num_chunks,
        mode=lib.mode, head_split=split,
    )  # fmt: skip
    return local, q[:, plan.q_heads[0] : plan.q_heads[1]]


def _chunks(sel, heads: tuple[int, int]) -> dict:
    """{(req, global KV head): sorted chunks} of Selections over KV heads `heads`."""
    out: dict = {}
    for b, h, c in zip(sel.req.tolist(), sel.kv_head.tolist(), sel.chunk.tolist()):
        out.setdefault((b, heads[0] + h), []).append(c)
    return {key: sorted(v) for key, v in out.items()}


def _case(rank: int, world: int) -> dict:
    from moska.distributed.comm import Collectives
    from moska.distributed.errors import TensorParallelConfigError
    from moska.distributed.tensor_parallel import ShardPlan
    from moska.routing import RoutingPolicy, select_chunks

    config = SimpleNamespace(num_heads=HQ, num_kv_heads=HKV, group_size=HQ // HKV,
                             intermediate_size=8, vocab_size=8)  # fmt: skip
    plan = ShardPlan.build(config, rank, world)
    comm = Collectives(None, rank, world, "gloo")
    results = {}
    for seed, (name, fields) in enumerate(POLICIES.items()):
        lib, q = _library(seed)
        policy = RoutingPolicy(**fields)
        want = _chunks(select_chunks(q, lib, 0, TOP_K, policy, 0.25, use_triton=False), (0, HKV))
        local, q_local = _local(lib, q, plan, comm)
        try:
            sel = select_chunks(q_local, local, 0, TOP_K, policy, 0.25, use_triton=False)
        except TensorParallelConfigError as e:
            results[name] = ("refused", str(e))
            continue
        got = _chunks(sel, plan.kv_heads)
        mine = {key: v for key, v in want.items() if plan.kv_heads[0] <= key[1] < plan.kv_heads[1]}
        results[name] = ("routed", got == mine, len(got), sum(map(len, got.values())))
    return results


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_routes_its_heads_as_one_process(world):
    per_rank = run_ranks(_case, world, timeout_s=90)
    for rank, results in enumerate(per_rank):
        for name, result in results.items():
            if world == 3 and name in NEEDS_WHOLE_HEADS:
                assert result[0] == "refused" and "KV heads" in result[1], (rank, name, result)
                continue
            assert result[0] == "routed", (rank, name, result)
            _, equal, rows, picks = result
            assert equal, (rank, name)
            assert rows == B  # one KV head per rank here: every row routed on it
            assert B <= picks <= B * TOP_K and picks < B * 8  # a subset of the 8 chunks
