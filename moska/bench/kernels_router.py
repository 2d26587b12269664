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


def router_variants(sms: int, topk: int, ranks: list[int], quick: bool) -> list[tuple]:
    """(name, scorer, per_kv_head, shortlist_factor, programs, rank) of each router timed in
    front of the grouped step. `keymax_kv_r{rank}` is the default policy (key-max per KV
    head, no shortlist) on an index of that rank; two_stage_s{f} a shortlist of f * top_k;
    two_stage_p1 the key-max launch capped at one program per SM (room beside it for the
    memory-bound unique attention)."""
    out: list[tuple[str, str, bool, int, int | None, int | None]] = [
        ("mean", "mean", False, 4, None, None),
        ("two_stage", "two_stage", False, 4, None, None),
    ]
    out += [("two_stage_s2", "two_stage", False, 2, None, None)]
    if not quick:
        out += [("two_stage_p1", "two_stage", False, 4, sms, None)]
    out += [(f"keymax_kv_r{r}", "keymax", True, 4, None, r) for r in ranks]
    out += [(f"keymax_kv_r{ranks[0]}_p1", "keymax", True, 4, sms, ranks[0])]
    out += [(f"rep_{n}_r{ranks[0]}", "keymax", True, 4, None, ranks[0]) for n in REP_ROUTERS]
    return out


# representative-key routers (moska/routing/representatives.py): key-max per KV head on m
# keys per chunk; `rep_{kind}{m}_r{rank}` in the router table
REP_ROUTERS = {"norm16": ("norm", 16), "norm32": ("norm", 32)}


# (block_b, block_n, warps, stages, queries projected once before the launch); the first
# is the default, the second the same tile projecting in every tile (the code before)
DENSE_TILES = (
    (32, 64, 4, 5, True),
    (32, 64, 4, 5, False),
    (64, 64, 4, 4, True),
    (64, 64, 8, 4, True),
    (32, 128, 4, 4, True),
    (16, 64, 4, 5, True),
)


def dense_tile_sweep(k_pool, B: int, rank: int, C: int = 256, L: int = 4096) -> dict:
    """The default router's scores alone (keymax_dense_scores, CUDA graph) at B over tile
    shapes (DENSE_TILES; the first is the default), with their TFLOP/s."""
    from moska.kernels import router
    from moska.kernels.router_dense import keymax_dense_scores

    offs = torch.arange(0, C * L + 1, L, dtype=torch.int32, device=DEV)
    index = router.build_routing_index(k_pool[: C * L], offs, rank=rank)
    q = torch.randn(B, HQ, D, device=DEV, dtype=DT)
    flops = 2 * B * HQ * C * L * rank
    row: dict = {"B": B, "rank": rank, "C": C, "L": L, "flops": flops}
    ref = None
    for bb, bn, nw, ns, proj in DENSE_TILES:
        key = f"b{bb}n{bn}w{nw}s{ns}" + ("" if proj else "_tileproj")

        def fn(bb=bb, bn=bn, nw=nw, ns=ns, proj=proj):
            return keymax_dense_scores(q, index.basis, index.lowrank_keys, offs, block_b=bb,
                                       block_n=bn, num_warps=nw, num_stages=ns,
                                       project_first=proj)  # fmt: skip

        try:
            out = fn()
            ref = out if ref is None else ref
            row[f"{key}_relerr"] = rel(out, ref)
            row[f"{key}_ms"] = bench_graph(fn)
            row[f"{key}_tflops"] = flops / row[f"{key}_ms"] / 1e9
        except Exception as e:
            row[f"{key}_err"] = repr(e)[-200:]
    log(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}))
    return row


def touched_pairs(sel) -> int:
    """Distinct (chunk, KV head) pairs the selections read: the KV a routed step must load
    (per-KV-head routing reads a chunk's KV only for the heads that picked it)."""
    key = sel.chunk.long() * (int(sel.kv_head.max()) + 1) + sel.kv_head.long()
    return int(torch.unique(key).numel())


def shortlisted_chunks(q, index, topk: int, factor: int) -> int:
    """Chunks some request's bound shortlist holds (the key-max stage reads their keys)."""
    from moska.kernels import router

    C = index.num_chunks
    short = router.score_chunks(q, index, "bound").sum(1).topk(min(C, factor * topk), -1)
    return int(torch.unique(short.indices).numel())


def time_routers(row, q, indexes: dict, topk, sms, time_modes, step_cost, floor_of, quick,
                 alone=bench_graph):  # fmt: skip
    """Each router of `router_variants` in front of the grouped step: the step's best time
    (`ours_with_router_{name}_ms`, from `time_modes(route_fn, prefix, row)`), the router
    alone (`alone(fn)`: a CUDA graph's replay), and the step's floor counting the (chunk,
    KV head) pairs the ROUTER picked plus the router's own reads and FLOPs
    (floors.router_cost); `indexes` maps rank -> routing index (the first is the index the
    other routers use). The CPU dry run passes its own timers."""
    from moska.bench.floors import router_cost
    from moska.kernels import router
    from moska.routing import representatives

    base = next(iter(indexes.values()))
    B, Hq, D = q.shape
    for name, scorer, per_head, factor, progs, rank in router_variants(
        sms, topk, list(indexes), quick
    ):  # quick: without the capped two-stage
        index = indexes[rank] if rank is not None else base

        rep = REP_ROUTERS.get(name[4:].rsplit("_r", 1)[0]) if name.startswith("rep_") else None

        def route_fn(index=index, scorer=scorer, per_head=per_head, factor=factor, progs=progs,
                     rep=rep):  # fmt: skip
            if rep is not None:  # cached: built before the timing, as a library build would
                spec = representatives.RepSpec(*rep)
                rindex = representatives.representatives_for(index, spec)
                return representatives.route_representatives(q, rindex, topk)
            return router.route(q, index, topk, scorer=scorer, per_kv_head=per_head,
                                shortlist_factor=factor, keymax_programs=progs)  # fmt: skip

        try:
            prefix = f"ours_with_router_{name}"
            if rep is not None:  # the representatives' index: m keys per chunk
                index = representatives.representatives_for(index, representatives.RepSpec(*rep))
            row[f"{prefix}_ms"] = time_modes(route_fn, prefix, row)
            row[f"router_{name}_alone_graph_ms"] = alone(route_fn)
            sel = route_fn()
            pairs = touched_pairs(sel)
            row[f"router_{name}_touched"] = int(torch.unique(sel.chunk).numel())
            row[f"router_{name}_touched_chunk_heads"] = pairs
            short = 0
            if scorer == "two_stage":
                short = shortlisted_chunks(q, index, topk, factor)
                row[f"router_{name}_shortlisted"] = short
            r_bytes, r_flops = router_cost(
                scorer, B, Hq, index.num_kv_heads, D, index.num_chunks,
                int(index.chunk_offsets[1] - index.chunk_offsets[0]), index.rank, short,
                factor * topk, lowrank_bytes=index.lowrank_keys.element_size(),
            )  # fmt: skip
            s_bytes, s_flops = step_cost(pairs)
            f = floor_of(s_bytes + r_bytes, s_flops + r_flops)
            row[f"floor_with_router_{name}_ms"] = f["floor_ms"]
            row[f"floor_with_router_{name}_bound"] = f["bound"]
            row[f"roofline_fraction_with_router_{name}"] = f["floor_ms"] / row[f"{prefix}_ms"]
        except Exception as e:
            row[f"router_{name}_err"] = repr(e)[-600:]


def router_summary(rows: list[dict]) -> dict:
    """Per B (uniform routing): the grouped step alone and with each router in front, as a
    fraction of its floor, and each router's own time (CUDA graph)."""
    out: dict = {}
    for r in rows:
        if r.get("routing") != "uniform":
            continue
        b = r["B"]
        out[f"grouped_alone_fraction_b{b}"] = r.get("roofline_fraction")
        for k_, v_ in r.items():
            if k_.startswith("roofline_fraction_with_router_"):
                out[f"{k_.removeprefix('roofline_fraction_with_')}_fraction_b{b}"] = v_
            elif k_.startswith("router_") and k_.endswith("_alone_graph_ms"):
                out[f"{k_.removesuffix('_graph_ms')}_ms_b{b}"] = v_
    return out


def print_router_table(rows: list[dict]) -> None:
    """B, router, step ms (best mode), router alone ms, floor ms, fraction, bound."""
    f = lambda x: "-" if x is None else f"{x:.3f}"
    log(f"{'B':>5} {'router':<16} {'step ms':>8} {'alone ms':>8} {'floor ms':>8} {'frac':>6} bound")
    for r in rows:
        if r.get("routing") != "uniform":
            continue
        log(f"{r['B']:>5} {'(none)':<16} {f(r['ours_ms']):>8} {'-':>8} {f(r['floor_ms']):>8} "
            f"{f(r['roofline_fraction']):>6} {r.get('bound')}")  # fmt: skip
        pre = "roofline_fraction_with_router_"
        names = [k_.removeprefix(pre) for k_ in r if k_.startswith(pre)]
        names += [k_[len("router_") : -4] for k_ in r if k_.startswith("router_") and
                  k_.endswith("_err") and k_[len("router_") : -4] not in names]  # fmt: skip
        for n in names:
            log(f"{r['B']:>5} {n:<16} {f(r.get(f'ours_with_router_{n}_ms')):>8} "
                f"{f(r.get(f'router_{n}_alone_graph_ms')):>8} "
                f"{f(r.get(f'floor_with_router_{n}_ms')):>8} "
                f"{f(r.get(f'roofline_fraction_with_router_{n}')):>6} "
                f"{r.get(f'floor_with_router_{n}_bound', r.get(f'router_{n}_err', ''))}")  # fmt: skip
