"""The default router's key-max scores alone per tile (``-m moska.bench.router_tile_sweep``): each
candidate tile's time at each batch, CUDA graphs, rounds with the order rotated; the
router's own floor (its bytes over a read-only stream, its FLOPs over the measured GEMM
peak, both measured in the same run); each tile's top-k chunks against the first tile's
and the fp32 reference's (router_ref). ``--next-tile-out`` writes the fastest tile per batch
that picks the first tile's chunks, for the decode bench's ``default_next`` row."""

from __future__ import annotations

import json

import torch

from moska.bench.decode_routers import NEXT_TILE_ENV, parse_tile
from moska.kernels import router_dense


def router_floor_ms(b: int, hq: int, hkv: int, d: int, tokens: int, chunks: int, rank: int,
                    ceilings: dict) -> dict:  # fmt: skip
    """The default router's own floor at batch b: its bytes (every fp16 low-rank key, the
    queries, the [B, Hkv, C] fp32 scores) over the read stream's rate, its FLOPs (one
    K = rank logit per query head and key) over the measured GEMM peak; the larger."""
    nbytes = tokens * hkv * rank * 2 + b * hq * d * 2 + b * hkv * chunks * 4
    flops = 2 * b * hq * tokens * rank
    read_ms = nbytes / ceilings["read_bytes_per_s"] * 1e3
    flop_ms = flops / ceilings["gemm_flops_per_s"] * 1e3
    return {"bytes": nbytes, "flops": flops, "read_floor_ms": read_ms,
            "flop_floor_ms": flop_ms, "floor_ms": max(read_ms, flop_ms)}  # fmt: skip


def topk_timing(scores: torch.Tensor, k: int, dev: str, capture_graph, time_ms) -> dict:
    """torch.topk against the one-launch row top-k (router_topk) on a score table: their
    times (CUDA graphs) and the share of rows whose chosen sets agree."""
    from moska.kernels.router_topk import topk_rows

    def sets(idx):
        return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)

    agree = (sets(topk_rows(scores, k)) == sets(scores.topk(k).indices)).all(-1)
    out = {"topk_rows_equal_to_torch_topk": agree.float().mean().item()}
    for name, fn in (("torch_topk", lambda: scores.topk(k).indices),
                     ("row_topk", lambda: topk_rows(scores, k))):  # fmt: skip
        fn()
        run = (capture_graph(fn) if dev == "cuda" else None) or fn
        out[f"{name}_ms"] = time_ms(run, iters=20 if dev == "cuda" else 1, warmup=1)
    return out


def routing_ab(q: torch.Tensor, index, top_k: int, dev: str, rounds: int, capture_graph,
               time_ms) -> dict:  # fmt: skip
    """The whole default routing call (projection, key-max scores, top-k, selections) with
    torch.topk against the row top-k (``router.ROW_TOPK``), CUDA graphs, ``rounds`` rounds
    alternating which goes first; medians, and whether the chosen triples are equal."""
    from moska.kernels import router

    runs, sels = {}, {}
    for name, flag in (("torch_topk", False), ("row_topk", True)):

        def fn(flag=flag):
            old = router.ROW_TOPK
            router.ROW_TOPK = flag
            try:
                return router.route(q, index, top_k, "keymax", per_kv_head=True)
            finally:
                router.ROW_TOPK = old

        sels[name] = fn()
        runs[name] = (capture_graph(fn) if dev == "cuda" else None) or fn
    times: dict[str, list[float]] = {n: [] for n in runs}
    order = list(runs)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(time_ms(runs[name], iters=10 if dev == "cuda" else 1, warmup=1))
    a, b = sels["torch_topk"], sels["row_topk"]
    out: dict = {f"route_{n}_ms": sorted(t)[len(t) // 2] for n, t in times.items()}
    out["route_ms_rounds"] = times
    # the chosen (request, KV head, chunk) triples; row_order may differ where two chosen
    # chunks of a row tie (either order is a valid merge order)
    out["route_selections_equal"] = all(
        torch.equal(x, y) for x, y in ((a.req, b.req), (a.kv_head, b.kv_head), (a.chunk, b.chunk))
    )
    out["route_row_order_equal"] = (
        a.row_order is not None
        and b.row_order is not None
        and bool(torch.equal(a.row_order, b.row_order))
    )
    return out


def tile_sweep(
    batches: list[int],
    tiles: list[str],
    tokens: int,
    chunk: int,
    dev: str,
    rounds: int = 1,
    ceilings: dict | None = None,
    top_k: int = 8,
) -> list:
    """The default router's key-max scores alone (one layer of 8B dims: Hq 32, Hkv 8,
    D 128, rank 32, random keys) per tile ``bBnNwWsS``, CUDA-graph timed; each tile's
    scores against the current tile's (bitwise equal, or the largest difference).
    ``rounds`` > 1 times every tile once per round, the order rotated each round (so a
    drift of the GPU's clock during the sweep does not favour the first tile), and reports
    the median of the rounds. With ``ceilings`` (bandwidth.measure_ceilings, the same run)
    each row has the router's own floor and its fraction; each tile's top-``top_k`` chunks
    are compared with the first tile's and with the fp32 reference's (router_ref)."""
    from moska.bench.common import LLAMA_3_1_8B, capture_graph, time_ms
    from moska.kernels.router import build_routing_index
    from moska.kernels.router_ref import keymax_scores_ref

    cfg: dict = LLAMA_3_1_8B
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    keys = torch.randn(tokens, hkv, d, device=dev, dtype=dtype)
    offsets = torch.arange(0, tokens + 1, chunk, dtype=torch.int32, device=dev)
    index = build_routing_index(keys, offsets)
    del keys
    rows = []
    for b in batches:
        q = torch.randn(b, hq, d, device=dev, dtype=dtype)
        args = (q, index.basis, index.lowrank_keys, index.chunk_offsets)
        base = router_dense.keymax_dense_scores(*args, **parse_tile(tiles[0])._asdict())
        pick = lambda s: s.topk(top_k, dim=-1).indices.sort(dim=-1).values
        base_pick = pick(base)
        ref = keymax_scores_ref(*args)
        rows_equal = (base_pick == pick(ref)).all(-1)
        ref_agree = rows_equal.float().mean().item()
        # rows whose reference gap at the k-th chunk exceeds twice the largest score error
        # cannot flip: there the chunks must be the reference's
        top = ref.topk(top_k + 1, dim=-1).values
        clear = (top[..., top_k - 1] - top[..., top_k]) > 2 * (base - ref).abs().max()
        ref_clear = {
            "rows_clear_of_ties": clear.float().mean().item(),
            "clear_rows_equal_to_fp32_reference": rows_equal[clear].float().mean().item(),
        }
        del ref
        runs, seen, same = {}, {}, {}
        ok = []
        for tag in tiles:
            tile = parse_tile(tag)
            out = torch.empty_like(base)

            def fn(tile=tile, out=out, args=args):
                out.copy_(router_dense.keymax_dense_scores(*args, **tile._asdict()))

            try:  # a tile may not compile (shared memory, registers): note it, go on
                fn()
            except Exception as e:  # noqa: BLE001
                print(f"tile {tag} B={b}: failed {repr(e)[:200]}", flush=True)
                rows.append({"batch": b, "tile": tag, "error": repr(e)[:300]})
                continue
            ok.append(tag)
            seen[tag] = (bool(torch.equal(out, base)), float((out - base).abs().max()))
            same[tag] = bool(torch.equal(pick(out), base_pick))
            runs[tag] = (capture_graph(fn) if dev == "cuda" else None) or fn
        times: dict[str, list[float]] = {tag: [] for tag in ok}
        for r in range(rounds):
            for tag in ok[r % len(ok) :] + ok[: r % len(ok)]:
                times[tag].append(time_ms(runs[tag], iters=10 if dev == "cuda" else 1, warmup=1))
        flops = 2 * b * hq * tokens * index.rank
        C = tokens // chunk
        topk = topk_timing(base, top_k, dev, capture_graph, time_ms)
        ab = routing_ab(q, index, top_k, dev, rounds, capture_graph, time_ms)
        topk.update({k: v for k, v in ab.items() if k != "route_ms_rounds"})
        print(f"topk B={b}: {json.dumps({k: round(v, 4) for k, v in topk.items()})}", flush=True)
        floor = router_floor_ms(b, hq, hkv, d, tokens, C, index.rank, ceilings) if ceilings else {}
        for tag in ok:
            ms = sorted(times[tag])[len(times[tag]) // 2]
            equal, diff = seen[tag]
            row = {"batch": b, "tile": tag, "ms": ms, "ms_rounds": times[tag],
                   "tflops": flops / ms / 1e9, "equal_to_default_tile": equal,
                   "max_abs_diff": diff, "same_chunks_as_first_tile": same[tag],
                   "first_tile_rows_equal_to_fp32_reference": ref_agree, **ref_clear,
                   **floor, **topk}  # fmt: skip
            if floor:
                row["floor_fraction"] = floor["floor_ms"] / ms
            rows.append(row)
            print(f"tile {tag:14s} B={b:5d} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s "
                  f"floor {row.get('floor_fraction', 0):.3f} bits_equal={equal} "
                  f"chunks_equal={same[tag]} ref_rows={ref_agree:.4f} "
                  f"rounds {' '.join(f'{t:.3f}' for t in times[tag])}", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    import argparse

    from moska.bench.common import environment, write_json

    ap = argparse.ArgumentParser(description="the default router's key-max tile sweep")
    ap.add_argument("--batch", type=int, nargs="+", default=[1024])
    ap.add_argument("--tiles", nargs="+", default=["b32n64w4s5", "b32n128w4s4"])
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=1, help="rounds, tile order rotated")
    ap.add_argument("--out", default="bench/results/router_tiles.json")
    ap.add_argument("--top-k", type=int, default=8, help="chunks compared per row")
    ap.add_argument(
        "--next-tile-out",
        default=None,
        help="write the fastest tile per batch that picks the first tile's chunks, "
        f"as ${NEXT_TILE_ENV} spells it (for the decode bench's default_next)",
    )
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny, on CPU (interpreter)")
    args = ap.parse_args(argv)  # fmt: skip
    dev = "cpu" if args.cpu_dry_run else "cuda"
    if args.cpu_dry_run:
        args.batch, args.tokens, args.chunk_size, args.top_k = [4], 256, 128, 1
    from moska.bench.bandwidth import measure_ceilings

    ceilings = measure_ceilings(dev) if dev == "cuda" else measure_ceilings(dev, 1 / 64, 2)
    rows = tile_sweep(args.batch, args.tiles, args.tokens, args.chunk_size, dev, args.rounds,
                      ceilings, args.top_k)  # fmt: skip
    best = {
        b: min((r for r in rows if r["batch"] == b and r.get("same_chunks_as_first_tile")),
               key=lambda r: r["ms"])
        for b in args.batch
    }  # fmt: skip
    summary: dict = {f"best_tile_b{b}": r["tile"] for b, r in best.items()}
    for r in rows:
        if "error" in r:
            continue
        tag = f"{r['tile']}_b{r['batch']}"
        summary[f"{tag}_ms"] = r["ms"]
        summary[f"{tag}_floor_fraction"] = r.get("floor_fraction")
    for b in args.batch:
        first = next(r for r in rows if r["batch"] == b and "error" not in r)
        summary[f"router_floor_ms_b{b}"] = first.get("floor_ms")
        summary[f"first_tile_rows_equal_to_fp32_reference_b{b}"] = first[
            "first_tile_rows_equal_to_fp32_reference"
        ]
        summary[f"speedup_best_over_first_b{b}"] = first["ms"] / best[b]["ms"]
        for key in ("torch_topk_ms", "row_topk_ms", "topk_rows_equal_to_torch_topk",
                    "route_torch_topk_ms", "route_row_topk_ms", "route_selections_equal",
                    "rows_clear_of_ties", "clear_rows_equal_to_fp32_reference"):  # fmt: skip
            summary[f"{key}_b{b}"] = first.get(key)
    spec = ",".join(f"{b}:{best[b]['tile']}" for b in sorted(best))
    summary["next_tiles"] = spec
    if args.next_tile_out:
        with open(args.next_tile_out, "w") as f:
            f.write(spec + "\n")
    write_json(args.out, {"environment": environment(), "default_tile": list(router_dense.TILE),
                          "tokens": args.tokens, "chunk_size": args.chunk_size,
                          "top_k": args.top_k, "ceilings": ceilings, "rows": rows,
                          "summary": summary})  # fmt: skip


if __name__ == "__main__":
    main()
