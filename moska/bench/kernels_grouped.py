"""Kernel benchmark, part 2: a routed decode-attention step, ours vs the strongest torch
baseline (kernels_baseline.py: varlen flash tiles + cuDNN + LSE merge, one CUDA graph), the
earlier eager torch composition, and dense per-request attention."""

import json

import torch

from moska.bench.floors import attention_flops, floor_ms, grouped_shared_cost
from moska.bench.kernels_baseline import baseline_step
from moska.bench.kernels_router import time_routers
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


BASELINES = [(128, "cudnn"), (256, "cudnn"), (128, "flash"), (256, "flash")]


def time_baselines(q, k, v, offs, pair_req, pair_chunk, k_u, v_u, chunk_len, o_ref, row):
    """Every variant of the varlen-tile baseline (tile rows x unique backend), each checked
    against ours and timed as one CUDA graph (eager when capture fails); then the best of
    them and of the eager composition: row["best_baseline"], row["best_baseline_ms"]."""
    for tile, unique in BASELINES:
        name = f"baseline_t{tile}_{unique}"

        def fn(tile=tile, unique=unique):
            return baseline_step(
                q, k, v, offs, pair_req, pair_chunk, k_u, v_u, SCALE, tile, unique, chunk_len
            )

        try:
            row[f"{name}_relerr"] = rel(fn(), o_ref)
            try:
                row[f"{name}_ms"] = bench_graph(fn)
            except Exception as e:  # noqa: BLE001 - time eagerly instead, say why
                row[f"{name}_graph_err"] = repr(e)[:300]
                torch.cuda.synchronize()
                row[f"{name}_ms"] = bench(fn)
        except Exception as e:  # noqa: BLE001 - a backend missing here drops one variant
            row[f"{name}_err"] = repr(e)[:300]
    cands = {k_[:-3]: v_ for k_, v_ in row.items() if k_.startswith("baseline_t") and
             k_.endswith("_ms") and row.get(k_[:-3] + "_relerr", 1.0) < 2e-2}  # fmt: skip
    if "torch_ms" in row:
        cands["torch_composition_eager"] = row["torch_ms"]
    if cands:
        row["best_baseline"] = min(cands, key=cands.get)
        row["best_baseline_ms"] = cands[row["best_baseline"]]


def case_grouped(k_pool, v_pool, B_list, peak, bw, quick, routers_only=False, ranks=None):
    """The grouped step at each B, uniform and Zipf routing, with the routers in front.
    ``routers_only``: uniform routing, no baselines or tile sweeps (the routing cost alone);
    ``ranks``: the routing index ranks the default policy is timed on (head_dim // 4 first:
    the index the other routers use)."""
    from moska.kernels import router

    C, L, topk, U = 256, 4096, 8, 4096
    S = C * L
    k, v = k_pool[:S], v_pool[:S]
    offs = torch.arange(0, S + 1, L, dtype=torch.int32, device=DEV)
    ranks = list(ranks or [D // 4, D // 2])
    indexes = {r: router.build_routing_index(k, offs, rank=r) for r in ranks}
    index = indexes[ranks[0]]
    rows_out = []
    t_dense1 = dense_one_request_ms(k, v, U)
    shape = {"C": C, "L": L, "topk": topk, "U": U, "S": S, "peak": peak, "bw": bw,
             "indexes": indexes, "routers_only": routers_only}  # fmt: skip
    for B in B_list:
        q = torch.randn(B, HQ, D, device=DEV, dtype=DT)
        kc = torch.randn(B * U // 16, 16, HKV, D, device=DEV, dtype=DT)  # paged, identity tables
        vc = torch.randn_like(kc)
        bt = torch.arange(B * U // 16, dtype=torch.int32, device=DEV).view(B, U // 16)
        sl = torch.full((B,), U, dtype=torch.int32, device=DEV)
        for routing in ("uniform",) if routers_only else ("uniform", "zipf"):
            row = grouped_row(B, routing, q, (kc, vc, bt, sl), k, v, offs, index, shape)
            row["dense_ms_extrapolated"] = t_dense1 * B
            row["speedup_vs_dense"] = row["dense_ms_extrapolated"] / row["ours_ms"]
            log(
                json.dumps(
                    {k_: round(v_, 4) if isinstance(v_, float) else v_ for k_, v_ in row.items()}
                )
            )
            rows_out.append(row)
        del kc, vc
        torch.cuda.empty_cache()
    return rows_out, t_dense1


def dense_one_request_ms(k, v, u):
    """One request's flash pass over the shared pool ++ its unique KV (memory-bound: B
    requests would each read their own copy, so the dense baseline is this times B)."""
    q1 = torch.randn(1, 1, HQ, D, device=DEV, dtype=DT)
    kd = torch.cat([k, torch.randn(u, HKV, D, device=DEV, dtype=DT)]).unsqueeze(0)
    vd = torch.cat([v, torch.randn(u, HKV, D, device=DEV, dtype=DT)]).unsqueeze(0)
    n = kd.shape[1]
    t = bench(
        lambda: torch.ops.aten._flash_attention_forward(
            q1, kd, vd, None, None, 1, n, 0.0, False, False, scale=SCALE
        ),
        rep=50,
    )
    torch.cuda.empty_cache()
    return t


def grouped_row(B, routing, q, unique_kv, k, v, offs, index, shape):
    """One (B, routing) row of the grouped step: ours in every stream mode, eager and as a
    graph, with and without the router; the baselines; floors and fractions."""
    C, L, topk, U = (shape[n] for n in ("C", "L", "topk", "U"))
    peak, bw = shape["peak"], shape["bw"]
    kc, vc, bt, sl = unique_kv
    k_u, v_u = kc.view(B, U, HKV, D), vc.view(B, U, HKV, D)
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
            except Exception as e:  # noqa: BLE001 - the eager time stands, say why
                row[f"{prefix}_{graph}_err"] = repr(e)[-300:]
        for k_, t_ in times.items():
            row[f"{prefix}_{k_}_ms"] = t_
        return min(times.values())

    ours = make_step("serial", lambda: sel)

    def comp():
        return torch_composition(q, k, v, offs, pair_req, pair_chunk, k_u, v_u, C, topk)

    o1, _ = ours()
    row = {"B": B, "routing": routing, "touched_chunks": int(torch.unique(pc).numel())}
    routers_only = shape["routers_only"]
    try:
        if routers_only:
            raise RuntimeError("--routers-only: baselines not run")
        o2, _ = comp()
        row["ours_vs_torch_relerr"] = rel(o1, o2)
        row["torch_ms"] = bench(comp)
    except Exception as e:  # noqa: BLE001 - a missing flash build drops this baseline
        row["torch_err"] = repr(e)[:300]
    row["ours_ms"] = time_modes(lambda: sel, "ours", row)
    if not routers_only:
        time_baselines(q, k, v, offs, pair_req, pair_chunk, k_u, v_u, L, o1, row)
    for mode in ("overlap", "prio"):
        row[f"ours_{mode}_relerr"] = rel(make_step(mode, lambda: sel)()[0], o1)
    for bm in () if routers_only else (32, 64, 128):
        for tma in (False, True):
            row[f"ours_shared_only_bm{bm}{'_tma' if tma else ''}_ms"] = bench(
                lambda bm=bm, tma=tma: grouped_shared_attention(
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
    row["ours_shared_only_ms"] = bench(lambda: grouped_shared_attention(q, k, v, offs, sel, SCALE))
    row["ours_unique_only_ms"] = bench(lambda: paged_decode_attention(q, kc, vc, bt, sl, SCALE))

    def step_cost(pairs: int) -> tuple[int, int]:
        """(bytes, FLOPs) of the attention step when `pairs` (chunk, KV head) pairs are
        read: K and V of those and of every request's unique KV once; QK^T and PV of every
        (request row, token) pair, top-k chunks and the unique KV per request."""
        nbytes = (pairs * L + B * U * HKV) * D * 2 * 2
        return nbytes, attention_flops(B * HQ, topk * L + U, D)

    kv_bytes, flops = step_cost(row["touched_chunks"] * HKV)
    if routing == "uniform":
        sms = torch.cuda.get_device_properties(DEV).multi_processor_count

        def floor_of(nbytes, nflops):
            return floor_ms(nbytes, nflops, bw * 1e9, peak * 1e12)

        # the routers in front (mean, two-stage, the default key-max per KV head at each
        # index rank): each one's floor counts what IT picked and read (kernels_router.py)
        indexes = shape["indexes"]
        time_routers(row, q, indexes, topk, sms, time_modes, step_cost, floor_of, routers_only)
    f = floor_ms(kv_bytes, flops, bw * 1e9, peak * 1e12)
    row.update(f)
    row["roofline_fraction"] = row["floor_ms"] / row["ours_ms"]
    # the shared kernel alone against its own floor (queries and partial outputs included)
    n_sel = B * topk * HKV
    k_bytes, k_flops = grouped_shared_cost(n_sel, HQ // HKV, row["touched_chunks"], L, HKV, D, B, 2)
    fk = floor_ms(k_bytes, k_flops, bw * 1e9, peak * 1e12)
    row["shared_only_floor_ms"], row["shared_only_bound"] = fk["floor_ms"], fk["bound"]
    row["shared_only_eager_floor_fraction"] = fk["floor_ms"] / row["ours_shared_only_ms"]
    if "torch_ms" in row:
        row["speedup_vs_torch"] = row["torch_ms"] / row["ours_ms"]
    if "best_baseline_ms" in row:
        row["speedup_vs_best_baseline"] = row["best_baseline_ms"] / row["ours_ms"]
    return row
