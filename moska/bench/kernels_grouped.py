"""Kernel benchmark, part 2: a routed decode-attention step, ours vs torch and dense."""

import json

import torch

from moska.bench.kernels_util import (
    DEV,
    DT,
    HKV,
    HQ,
    SCALE,
    D,
    bench,
    bench_graph,
    log,
    rel,
    sorted_sel,
)
from moska.kernels.merge import merge_selections
from moska.kernels.paged_attention import (
    paged_decode_attention,
)
from moska.kernels.shared_attention import grouped_shared_attention


def zipf_pairs(b, c, k, s=1.1):
    w = 1.0 / torch.arange(1, c + 1, device=DEV, dtype=torch.float32) ** s
    w = w[torch.randperm(c, device=DEV)]
    chunk = torch.multinomial(w.expand(b, c), k, replacement=False)  # [B, k]
    return torch.arange(b, device=DEV)[:, None].expand(b, k).flatten(), chunk.flatten()


def torch_composition(q, k_pool, v_pool, offs, pair_req, pair_chunk, k_u, v_u, C, topk):
    """Best torch composition: varlen flash over all chunks (requests as rows), flash for
    unique, torch LSE merge. pair_*: [B*topk] (req, chunk) sorted by chunk."""
    B = q.shape[0]
    counts = torch.bincount(pair_chunk, minlength=C)
    cu_q = torch.zeros(C + 1, dtype=torch.int32, device=DEV)
    cu_q[1:] = torch.cumsum(counts, 0)
    max_q = int(counts.max())
    qs = q[pair_req]  # [P, Hq, D]
    o_s, lse_s = torch.ops.aten._flash_attention_forward(
        qs, k_pool, v_pool, cu_q, offs, max_q, 4096, 0.0, False, False, scale=SCALE
    )[:2]
    o_u, lse_u = torch.ops.aten._flash_attention_forward(
        q.unsqueeze(1), k_u, v_u, None, None, 1, k_u.shape[1], 0.0, False, False, scale=SCALE
    )[:2]
    # merge: each request has exactly topk pairs
    order = torch.argsort(pair_req, stable=True)
    lse_s = lse_s.t()[order].view(B, topk, HQ)  # [B, k, Hq]
    o_s = o_s[order].view(B, topk, HQ, D).float()
    lse_all = torch.cat([lse_s, lse_u.view(B, 1, HQ)], 1)  # [B, k+1, Hq]
    lse = torch.logsumexp(lse_all, 1)
    w = torch.exp(lse_all - lse[:, None])
    o = (w[:, :topk, :, None] * o_s).sum(1) + w[:, topk, :, None] * o_u.view(B, HQ, D).float()
    return o.to(q.dtype), lse


def case_grouped(k_pool, v_pool, B_list, peak, bw, quick):
    from moska.kernels import router

    C, L, topk, U = 256, 4096, 8, 4096
    S = C * L
    k, v = k_pool[:S], v_pool[:S]
    offs = torch.arange(0, S + 1, L, dtype=torch.int32, device=DEV)
    index = router.build_routing_index(k, offs)
    rows_out = []
    # dense per request: one request over shared ++ unique, measured once, times B
    q1 = torch.randn(1, 1, HQ, D, device=DEV, dtype=DT)
    kd = torch.cat([k, torch.randn(U, HKV, D, device=DEV, dtype=DT)]).unsqueeze(0)
    vd = torch.cat([v, torch.randn(U, HKV, D, device=DEV, dtype=DT)]).unsqueeze(0)
    t_dense1 = bench(
        lambda: torch.ops.aten._flash_attention_forward(
            q1, kd, vd, None, None, 1, S + U, 0.0, False, False, scale=SCALE
        ),
        rep=50,
    )
    del kd, vd
    torch.cuda.empty_cache()
    for B in B_list:
        q = torch.randn(B, HQ, D, device=DEV, dtype=DT)
        kc = torch.randn(B * U // 16, 16, HKV, D, device=DEV, dtype=DT)  # paged, identity tables
        vc = torch.randn_like(kc)
        bt = torch.arange(B * U // 16, dtype=torch.int32, device=DEV).view(B, U // 16)
        sl = torch.full((B,), U, dtype=torch.int32, device=DEV)
        k_u, v_u = kc.view(B, U, HKV, D), vc.view(B, U, HKV, D)
        for routing in ("uniform", "zipf"):
            if routing == "uniform":
                scores = torch.rand(B, C, device=DEV)
                pr = torch.arange(B, device=DEV)[:, None].expand(B, topk).flatten()
                pc = scores.topk(topk, -1).indices.flatten()
            else:
                pr, pc = zipf_pairs(B, C, topk)
            sel = sorted_sel(pc.view(B, topk), C)
            o_c = torch.sort(pc * B + pr).values
            pair_req, pair_chunk = o_c % B, o_c // B

            side = torch.cuda.Stream()
            high = torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[1])

            def make_step(mode, route_fn):
                """One attention step on the selections route_fn() gives. serial: all on the
                current stream; overlap: unique KV (memory-bound) on a side stream beside the
                shared attention; prio: as the engine runs it, routing + shared attention on a
                high-priority side stream, unique KV on the current stream."""

                def shared():
                    s_ = route_fn()
                    return (*grouped_shared_attention(q, k, v, offs, s_, SCALE), s_)

                def unique():
                    return paged_decode_attention(q, kc, vc, bt, sl, SCALE)

                def run():
                    cur = torch.cuda.current_stream()
                    if mode == "serial":
                        o_s, lse_s, s_ = shared()
                        o_u, lse_u = unique()
                    elif mode == "overlap":
                        side.wait_stream(cur)
                        with torch.cuda.stream(side):
                            o_u, lse_u = unique()
                        o_s, lse_s, s_ = shared()
                        cur.wait_stream(side)
                    else:
                        high.wait_stream(cur)
                        with torch.cuda.stream(high):
                            o_s, lse_s, s_ = shared()
                        o_u, lse_u = unique()
                        cur.wait_stream(high)
                    return merge_selections(o_u, lse_u, o_s, lse_s, s_)

                return run

            def time_modes(route_fn, prefix, row):
                """Eager and CUDA-graph times of every mode: {prefix}_{mode}[_graph]_ms."""
                times = {}
                for mode, name in (("serial", "eager"), ("overlap", "overlap"), ("prio", "prio")):
                    fn = make_step(mode, route_fn)
                    times[name] = bench(fn)
                    graph = "graph" if mode == "serial" else f"{name}_graph"
                    try:
                        times[graph] = bench_graph(fn)
                    except Exception as e:
                        row[f"{prefix}_{graph}_err"] = repr(e)[-300:]
                for k_, t_ in times.items():
                    row[f"{prefix}_{k_}_ms"] = t_
                return min(times.values())

            ours = make_step("serial", lambda: sel)

            def comp():
                return torch_composition(q, k, v, offs, pair_req, pair_chunk, k_u, v_u, C, topk)

            o1, _ = ours()
            row = dict(B=B, routing=routing, touched_chunks=int(torch.unique(pc).numel()))
            try:
                o2, _ = comp()
                row["ours_vs_torch_relerr"] = rel(o1, o2)
                row["torch_ms"] = bench(comp)
            except Exception as e:
                row["torch_err"] = repr(e)[:300]
            row["ours_ms"] = time_modes(lambda: sel, "ours", row)
            for mode in ("overlap", "prio"):
                row[f"ours_{mode}_relerr"] = rel(make_step(mode, lambda: sel)()[0], o1)
            for bm in (32, 64, 128):
                for tma in (False, True):
                    row[f"ours_shared_only_bm{bm}{'_tma' if tma else ''}_ms"] = bench(
                        lambda: grouped_shared_attention(
                            q,
                            k,
                            v,
                            offs,
                            sel,
                            SCALE,
                            block_m=bm,
                            block_n=64,
                            num_warps=8 if bm == 128 else 4,
                            num_stages=3,
                            use_tma=tma,
                        )
                    )
            row["ours_shared_only_ms"] = bench(
                lambda: grouped_shared_attention(q, k, v, offs, sel, SCALE)
            )
            row["ours_unique_only_ms"] = bench(
                lambda: paged_decode_attention(q, kc, vc, bt, sl, SCALE)
            )
            kv_bytes = (row["touched_chunks"] * L + B * U) * HKV * D * 2 * 2
            flops = 4 * (B * topk * L + B * U) * HQ * D
            if routing == "uniform":
                sms = torch.cuda.get_device_properties(DEV).multi_processor_count
                # two_stage_p{n}: the key-max launch capped at n programs per SM, so that it
                # can sit beside the unique attention (memory-bound) instead of after it
                for scorer, progs in (
                    ("mean", None),
                    ("two_stage", None),
                    ("two_stage_p1", sms),
                    ("two_stage_p2", 2 * sms),
                ):

                    def route_fn(scorer=scorer.split("_p")[0], progs=progs):
                        return router.route(q, index, topk, scorer=scorer, keymax_programs=progs)

                    try:
                        prefix = f"ours_with_router_{scorer}"
                        row[f"{prefix}_ms"] = time_modes(route_fn, prefix, row)
                        touched = int(torch.unique(route_fn().chunk).numel())
                        row[f"router_{scorer}_touched"] = touched
                        # the router's own reads: summaries; two-stage also the low-rank keys
                        # of every chunk some request shortlisted (all of them at these B)
                        r_bytes = 2 * C * HKV * D * 2
                        r_flops = 0
                        if scorer.startswith("two_stage"):
                            r_bytes += S * HKV * index.rank * 2
                            r_flops = 2 * B * 4 * topk * L * HQ * index.rank
                        floor_r = max(
                            (kv_bytes + r_bytes) / bw / 1e6, (flops + r_flops) / peak / 1e9
                        )
                        row[f"floor_with_router_{scorer}_ms"] = floor_r
                        row[f"roofline_fraction_with_router_{scorer}"] = (
                            floor_r / row[f"ours_with_router_{scorer}_ms"]
                        )
                    except Exception as e:
                        row[f"router_{scorer}_err"] = repr(e)[-600:]
            row["floor_ms"] = max(kv_bytes / bw / 1e6, flops / peak / 1e9)
            row["roofline_fraction"] = row["floor_ms"] / row["ours_ms"]
            row["dense_ms_extrapolated"] = t_dense1 * B
            row["speedup_vs_dense"] = row["dense_ms_extrapolated"] / row["ours_ms"]
            if "torch_ms" in row:
                row["speedup_vs_torch"] = row["torch_ms"] / row["ours_ms"]
            log(
                json.dumps(
                    {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}
                )
            )
            rows_out.append(row)
        del kc, vc, k_u, v_u
        torch.cuda.empty_cache()
    return rows_out, t_dense1
