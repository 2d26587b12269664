"""Kernel benchmark: key-max pair-scoring tile sizes and router timing."""

import json

import torch

from moska.bench.kernels_util import DEV, DT, HQ, D, bench, kernel_breakdown, log, rel
from moska.kernels.selections import from_topk


def case_keymax_tiles(k_pool, B_list):
    """Key-max pair scoring of the two-stage router alone, over tile shapes (for tuning)."""
    from moska.kernels import router
    from moska.kernels.router_scores import keymax_pair_scores

    C, L, topk = 256, 4096, 8
    k = k_pool[: C * L]
    offs = torch.arange(0, C * L + 1, L, dtype=torch.int32, device=DEV)
    index = router.build_routing_index(k, offs)
    rows_out = []
    for B in B_list:
        q = torch.randn(B, HQ, D, device=DEV, dtype=DT)
        short = router.score_chunks(q, index, "bound").sum(1).topk(4 * topk, -1).indices
        pairs = from_topk(short[:, None, :], 1, C)
        row = {"B": B, "pairs": int(pairs.req.numel())}
        ref = None
        for bb, bn, nw in ((16, 64, 4), (16, 128, 4), (32, 64, 4), (32, 128, 8), (64, 64, 8)):

            def fn(bb=bb, bn=bn, nw=nw):
                return keymax_pair_scores(
                    q,
                    index.basis,
                    index.lowrank_keys,
                    offs,
                    pairs.req,
                    pairs.chunk,
                    block_b=bb,
                    block_n=bn,
                    num_warps=nw,
                )

            try:
                out = fn()
                ref = out if ref is None else ref
                row[f"b{bb}n{bn}w{nw}_relerr"] = rel(out, ref)
                row[f"b{bb}n{bn}w{nw}_ms"] = bench(fn)
            except Exception as e:
                row[f"b{bb}n{bn}w{nw}_err"] = repr(e)[-200:]
        row["route_two_stage_ms"] = bench(lambda: router.route(q, index, topk, "two_stage"))
        try:  # where the two-stage router's time goes, per kernel
            row["route_two_stage_kernels_us"] = kernel_breakdown(
                lambda: router.route(q, index, topk, "two_stage")
            )
        except Exception as e:
            row["route_two_stage_kernels_err"] = repr(e)[:200]
        row["route_mean_ms"] = bench(lambda: router.route(q, index, topk, "mean"))
        log(
            json.dumps(
                {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}
            )
        )
        rows_out.append(row)
    return rows_out
