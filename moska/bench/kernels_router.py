"""Kernel benchmark: key-max pair-scoring tile sizes (CUDA-graph timing) and router timing."""

# Each timed lambda below runs inside its own loop iteration (do_bench calls it at once),
# so late binding of loop variables (B023) cannot bite; a failing variant or backend is
# recorded in its row and the run goes on (BLE001).
# ruff: noqa: B023, BLE001

import json

import torch

from moska.bench.kernels_util import (
    DEV,
    DT,
    HQ,
    D,
    bench,
    bench_graph,
    kernel_breakdown,
    log,
    rel,
)
from moska.kernels.selections import from_topk


def _topk_changed(scores, ref, pairs, B: int, C: int, topk: int) -> float:
    """Fraction of (request, top-k slot) choices that differ when routing on ``scores`` instead
    of ``ref`` (both [P, Hkv] over the same shortlist pairs; summed over KV heads)."""
    picks = []
    for sc in (scores, ref):
        full = torch.full((B, C), float("-inf"), device=sc.device)
        full[pairs.req.long(), pairs.chunk.long()] = sc.sum(1)
        picks.append(
            torch.zeros(B, C, dtype=torch.bool, device=sc.device).scatter_(
                1, full.topk(topk, -1).indices, True
            )
        )
    return float((picks[0] & ~picks[1]).sum()) / (B * topk)


def _fp32_pair_scores(q, basis, k_chunks, pairs, C: int) -> torch.Tensor:
    """Exact key-max scores of the pairs: fp32 queries and fp32 low-rank keys -> [P, Hkv]."""
    B, Hq, Dq = q.shape
    Hkv = basis.shape[0]
    qr = torch.einsum("bhgd,hdr->bhgr", q.float().view(B, Hkv, Hq // Hkv, Dq), basis.float())
    out = torch.empty(pairs.req.numel(), Hkv, device=q.device)
    bounds = torch.searchsorted(
        pairs.chunk, torch.arange(C + 1, device=q.device, dtype=torch.int32)
    )
    for c, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        if b > a:
            lk = torch.einsum("lhd,hdr->lhr", k_chunks[c].float(), basis.float())
            logits = torch.einsum("nhgr,lhr->nhgl", qr[pairs.req[a:b].long()], lk)
            out[a:b] = logits.amax(dim=(2, 3))
    return out


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
        # fp32-accumulated scores on bf16 low-rank keys (the path before fp16 keys) are the
        # reference: rel err of the fp16 path, and how many routed chunks change
        lk_bf16 = index.lowrank_keys.to(DT)
        ref = None
        # at B = 256 also the exact scores (fp32 queries and low-rank keys, torch): how many
        # routed chunks each low-precision path changes against exact routing
        exact = None
        if B <= 256:
            exact = _fp32_pair_scores(q, index.basis, k.view(C, L, *k.shape[1:]), pairs, C)
        variants = [("bf16", lk_bf16, 16, 64, 4), ("bf16", lk_bf16, 32, 64, 4)]
        variants += [
            ("f16", index.lowrank_keys, bb, bn, nw)
            for bb, bn, nw in (
                (16, 64, 4),
                (32, 64, 4),
                (16, 128, 4),
                (32, 128, 4),
                (32, 128, 8),
                (64, 64, 8),
                (64, 128, 8),
            )
        ]
        variants += [
            ("f16", index.lowrank_keys, 16, 64, 4, 4),
            ("f16", index.lowrank_keys, 16, 64, 4, 2),
            ("f16", index.lowrank_keys, 16, 128, 4, 4),
            ("f16", index.lowrank_keys, 32, 64, 4, 5),
            ("f16", index.lowrank_keys, 32, 64, 4, 4),
            ("f16", index.lowrank_keys, 32, 128, 4, 4),
            ("f16", index.lowrank_keys, 16, 128, 4, 5),
        ]
        for name, lk, bb, bn, nw, *st in variants:
            ns = st[0] if st else 3
            key = f"{name}_b{bb}n{bn}w{nw}" + (f"s{ns}" if st else "")

            def fn(lk=lk, bb=bb, bn=bn, nw=nw, ns=ns):
                return keymax_pair_scores(
                    q,
                    index.basis,
                    lk,
                    offs,
                    pairs.req,
                    pairs.chunk,
                    block_b=bb,
                    block_n=bn,
                    num_warps=nw,
                    num_stages=ns,
                )

            try:
                out = fn()
                ref = out if ref is None else ref
                row[f"{key}_relerr"] = rel(out, ref)
                row[f"{key}_topk_changed"] = _topk_changed(out, ref, pairs, B, C, topk)
                if exact is not None:
                    row[f"{key}_relerr_exact"] = rel(out, exact)
                    row[f"{key}_topk_changed_exact"] = _topk_changed(out, exact, pairs, B, C, topk)
                # graph replay: eager timing of these ~0.3-0.7 ms calls swung by 2x with host
                # launch jitter (the work list is ~15 small torch ops before the kernel)
                row[f"{key}_ms"] = bench_graph(fn)
            except Exception as e:
                row[f"{key}_err"] = repr(e)[-200:]
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
