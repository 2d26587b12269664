"""End-to-end decode benchmark at Llama-3.1-8B dims (random bf16 weights, no download).

A 512K-token shared library in chunks of 4096, B concurrent requests with 1K unique tokens
each. Three modes timed in the same run, per decode step (model forward + logits + argmax):
  moska      routing (top-k chunks) + grouped shared attention + paged unique + LSE merge
  all        sharing without routing: every request reads every chunk, still batched per chunk
  dense      each request reads the shared KV itself through its block table (what vLLM /
             SGLang prefix caching do: shared physical blocks, one attention pass per request)
The library KV and every request's KV are random (their values do not change the cost), laid
out in one paged cache so that the dense baseline's block tables point at the same shared
blocks the library pool views. Also: the library build rate (tokens/s, MFU) through the real
builder on a shorter library, and the roofline step estimate.

    python -m moska.bench.decode [--batch 64 128 256] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

if "--cpu-dry-run" in sys.argv:  # Triton picks its interpreter when it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from moska.attention.backend import PagedAttention
from moska.attention.kv_cache import PagedKVCache
from moska.attention.metadata import AttentionMetadata, LibraryGroup
from moska.bench.bandwidth import check_floors, measure_ceilings, raise_if_floors_broken
from moska.bench.common import (
    LLAMA_3_1_8B,
    capture_graph,
    environment,
    random_loaded_model,
    time_ms,
    write_json,
)
from moska.bench.decode_report import plot, profile_step, step_floor, summarize
from moska.bench.decode_routers import (
    ROUTERS,
    fixed_rows,
    floor_scorer,
    policy_of,
    profile_router,
    router_alone,
    router_row,
    routers_summary,
)
from moska.kernel_ops import kernel_ops

DEV = "cuda"  # --cpu-dry-run switches the whole harness to CPU with a tiny model


@dataclass(eq=False)
class BenchLibrary:
    """The runtime view a LibraryGroup needs, over a region of the paged cache."""

    k_pools: list
    v_pools: list
    routing: list
    chunk_offsets: torch.Tensor
    num_chunks: int
    position_offset: int
    mode: str = "prefix"  # requests continue after the library (routing's always-last chunk)


def build_library_view(
    cache: PagedKVCache, lib_tokens: int, chunk: int, scorer: str, bs: int, rank: int | None = None
):
    from moska.kernels.router import build_routing_index

    nblk = lib_tokens // bs
    L, _, _, hkv, d = cache.k.shape
    offsets = torch.arange(0, lib_tokens + 1, chunk, dtype=torch.int32, device=DEV)
    k_pools = [cache.k[l, :nblk].view(lib_tokens, hkv, d) for l in range(L)]
    v_pools = [cache.v[l, :nblk].view(lib_tokens, hkv, d) for l in range(L)]
    routing = []
    if scorer != "all":
        routing = [build_routing_index(k_pools[l], offsets, rank=rank) for l in range(L)]
    return BenchLibrary(k_pools, v_pools, routing, offsets, lib_tokens // chunk, lib_tokens)


def decode_metadata(b: int, unique: int, lib_blocks: int, bs: int, dense: bool):
    """Block tables for B requests: request i owns blocks after the library's; dense mode
    puts the library's blocks in front (shared physical blocks, as prefix caching does)."""
    per_req = math.ceil((unique + 1) / bs)
    own = lib_blocks + torch.arange(b * per_req, device=DEV).view(b, per_req)
    if dense:
        shared = torch.arange(lib_blocks, device=DEV).expand(b, lib_blocks)
        tables = torch.cat([shared, own], dim=1)
        ctx = lib_blocks * bs + unique + 1
    else:
        tables = own
        ctx = unique + 1
    new_pos = ctx - 1  # the new token's slot in its own table
    slot = tables[:, new_pos // bs].long() * bs + new_pos % bs
    return AttentionMetadata(
        slot_mapping=slot,
        cu_q_lens=torch.arange(b + 1, dtype=torch.int32, device=DEV),
        seq_lens=torch.full((b,), ctx, dtype=torch.int32, device=DEV),
        block_tables=tables.to(torch.int32).contiguous(),
        decode_only=True,
    )


def build_parser() -> argparse.ArgumentParser:
    from moska.routing.policy import RoutingPolicy

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--library-tokens", type=int, default=512 * 1024)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--unique-tokens", type=int, default=1024)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--scorer", default=RoutingPolicy().scorer,
                    help="the router's scorer, per KV head as the engine's default policy "
                    "(default: %(default)s, the engine's; two_stage was the default before "
                    "issue 17)")  # fmt: skip
    ap.add_argument("--routing-rank", type=int, default=None,
                    help="the routing index's rank (default head_dim // 4, as libraries)")  # fmt: skip
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (quick runs)")
    ap.add_argument("--build-tokens", type=int, default=16384,
                    help="library build rate on this many tokens (0: skip it)")  # fmt: skip
    ap.add_argument("--modes", nargs="+", default=None,
                    choices=("moska", "capped", "serial", "all", "dense"),
                    help="time only these modes (default: all of them)")  # fmt: skip
    ap.add_argument("--routers", nargs="+", default=None, choices=ROUTERS,
                    help="time the moska step once per router in the same run (decode_routers"
                    ".py: none, two_stage_old, default_before, default, default_shortlist_kv) "
                    "instead of once with --scorer; also each router alone, and a profile of "
                    "one routing call at the largest batch")  # fmt: skip
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="bench/results/decode.json")
    ap.add_argument("--quick", action="store_true", help="small shapes for a fast check")
    ap.add_argument(
        "--cuda-graph",
        action="store_true",
        help="time each mode's step as one captured CUDA graph (no launch gaps)",
    )
    ap.add_argument("--profile", action="store_true", help="kernel table of one moska step")
    ap.add_argument("--cpu-dry-run", action="store_true", help="check the harness on CPU")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.cpu_dry_run:
        return cpu_dry_run(args)
    if not torch.cuda.is_available():
        raise SystemExit("the decode benchmark needs a CUDA GPU (or --cpu-dry-run)")
    if args.quick:
        args.library_tokens, args.batch, args.layers, args.build_tokens = 65536, [64], 4, 4096
    cfg = dict(LLAMA_3_1_8B)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    run_bench(args, cfg, torch.bfloat16)


def cpu_dry_run(args) -> None:
    """The same harness on CPU at toy dims through the Triton interpreter (slow, tiny)."""
    global DEV
    DEV = "cpu"
    from moska.model.default import CONFIG

    cfg = dict(CONFIG, num_hidden_layers=2)
    args.library_tokens, args.chunk_size, args.unique_tokens = 512, 64, 32
    args.batch, args.top_k, args.iters = [4], 2, 1
    args.build_tokens = min(args.build_tokens, 256)  # 0 still skips the build
    run_bench(args, cfg, torch.float32)


def run_bench(args, cfg: dict, dtype: torch.dtype) -> None:
    bs = 16
    # floors divide bytes by a read-only stream's bandwidth (bandwidth.py says why)
    ceilings = measure_ceilings(DEV) if DEV == "cuda" else measure_ceilings(DEV, 1 / 64, 2)
    loaded = random_loaded_model(cfg, dtype, DEV)
    model, mcfg = loaded.model, loaded.config
    n_params = sum(p.numel() for p in model.parameters())

    build = None
    if args.build_tokens > 0:  # 0: skip the library build rate (short device runs)
        build = library_build_rate(loaded, args.build_tokens, args.chunk_size, ceilings, n_params)
    if DEV == "cuda":
        torch.cuda.empty_cache()

    lib_blocks = args.library_tokens // bs
    per_req = math.ceil((args.unique_tokens + 1) / bs)
    num_blocks = lib_blocks + max(args.batch) * per_req
    cache = PagedKVCache(
        mcfg.num_layers, num_blocks, bs, mcfg.num_kv_heads, mcfg.head_dim, dtype, DEV
    )
    for t in (cache.k, cache.v):
        for l in range(t.shape[0]):
            t[l].normal_()
    lib = build_library_view(
        cache, args.library_tokens, args.chunk_size, args.scorer, bs, args.routing_rank
    )
    attention = PagedAttention(cache, kernel_ops("triton"), mcfg.sm_scale)
    model.kernels = kernel_ops("auto", DEV)  # norms, RoPE, SiLU-and-mul: Triton on CUDA
    rank = lib.routing[0].rank if lib.routing else 0

    rows = []
    check: dict[str, torch.Tensor] = {}
    fixed = None
    for b in args.batch:
        ids = torch.randint(0, mcfg.vocab_size, (b,), device=DEV)
        modes: tuple[str, ...] = ("moska", "serial", "all", "dense")
        if args.scorer in ("keymax", "two_stage"):
            modes = ("moska", "capped", "serial", "all", "dense")
        modes = tuple(m for m in modes if args.modes is None or m in args.modes)
        runs = [(m, r) for m in modes for r in (args.routers if m == "moska" else None) or [None]]
        if args.routers:  # the no-router rows' fixed chunks (none: uniform, none_zipf)
            fixed = fixed_rows(
                args.routers, b, mcfg.num_kv_heads, lib.num_chunks, args.top_k, mcfg.num_layers,
                DEV,
            )  # fmt: skip
        for mode, router in runs:
            # serial: moska with the shared attention on the current stream (no overlap);
            # capped: overlapped, the key-max launch capped at one program per SM
            attention.overlap = mode != "serial"
            attention.keymax_programs_per_sm = 1 if mode == "capped" else None
            meta = decode_metadata(b, args.unique_tokens, lib_blocks, bs, mode == "dense")
            pos = torch.full((b,), args.library_tokens + args.unique_tokens, device=DEV)
            if mode != "dense":
                top_k = lib.num_chunks if mode == "all" else args.top_k
                meta.groups.append(
                    LibraryGroup(
                        library=lib,
                        rows=torch.arange(b, device=DEV),
                        top_k=top_k,
                        scorer=args.scorer,
                        policy=policy_of(router) if router else None,
                        all_rows=True,
                        record=mode == "moska",
                    )
                )
            bound = attention.bind(meta)

            def step(ids=ids, pos=pos, bound=bound):
                h = model(ids, pos, bound)
                return model.compute_logits(h).argmax(-1)

            if b == args.batch[0] and mode in ("all", "dense"):
                # Exactness rule: all chunks + unique, merged, equals dense attention.
                with torch.no_grad():
                    check[mode] = model.compute_logits(model(ids, pos, bound)).float()
            with router_row(router or "", fixed):
                if args.profile and mode == "moska" and b == args.batch[-1]:
                    profile_step(step, args.out)
                iters = 2 if mode == "dense" else args.iters
                graphed = None
                if args.cuda_graph and DEV == "cuda":
                    graphed = capture(step)
                ms = time_ms(graphed or step, iters=iters, warmup=1)
            label = f"moska:{router}" if router else mode
            row = {
                "batch": b,
                "mode": label,
                "step_ms": ms,
                "decode_tokens_per_s": b / (ms / 1e3),
                "cuda_graph": graphed is not None,
            }
            if mode == "moska" and bound.routing[0].selections:
                sel = next(iter(bound.routing[0].selections.values()))
                row["chunks_touched"] = int(torch.unique(sel.chunk).numel())
                pair = sel.chunk.long() * mcfg.num_kv_heads + sel.kv_head.long()
                row["chunk_heads_touched"] = int(torch.unique(pair).numel())
            if router:
                q = torch.randn(b, mcfg.num_heads, mcfg.head_dim, device=DEV, dtype=dtype)
                row.update(router_alone(q, lib, args.top_k, router, mcfg.sm_scale, capture))
            rows.append(row)
            print(f"B={b:4d} {label:22s} {ms:9.2f} ms  {b / (ms / 1e3):10.1f} tok/s", flush=True)
        all_heads = lib.num_chunks * mcfg.num_kv_heads
        mine = [r for r in rows if r["batch"] == b]
        moska = next((r for r in mine if r["mode"] == "moska"), {})  # other modes: its floor
        for r in mine:
            routed = r["mode"].startswith("moska:")
            scorer = floor_scorer(r["mode"][6:]) if routed else args.scorer
            touched = (r if routed else moska).get("chunk_heads_touched", all_heads)
            floors = {
                s: step_floor(
                    batch=b, cfg=mcfg, n_params=n_params, library_tokens=args.library_tokens,
                    chunk_size=args.chunk_size, unique_tokens=args.unique_tokens,
                    top_k=args.top_k, scorer=s, rank=rank, ceilings=ceilings,
                    touched_chunk_heads=touched,
                )
                for s in (scorer, "none")
            }  # fmt: skip
            if r["mode"].startswith("moska"):
                r.update({k: v for k, v in floors[scorer].items() if k != "roofline_ms"})
            r["roofline_ms"] = floors[scorer]["roofline_ms"]
            r["roofline_fraction"] = r["roofline_ms"] / r["step_ms"]
            # the measure: the step against the floor of its routed attention alone
            r["unrouted_floor_ms"] = floors["none"]["roofline_ms"]
            r["unrouted_floor_fraction"] = r["unrouted_floor_ms"] / r["step_ms"]
    profiles: list[dict] = []
    if args.routers:  # what one routing call does at the largest batch
        b = max(args.batch)
        q = torch.randn(b, mcfg.num_heads, mcfg.head_dim, device=DEV, dtype=dtype)
        profiles = [
            profile_router(q, lib, args.top_k, r, mcfg.sm_scale)
            for r in args.routers
            if policy_of(r) is not None
        ]
    summary = summarize(rows, build)
    summary["routing_rank"] = rank
    if args.routers:
        summary["routers"] = routers_summary(rows, profiles)
    if "all" in check and "dense" in check:  # both ran (--modes may leave them out)
        exact_err = float((check["all"] - check["dense"]).norm() / check["dense"].norm())
        top1 = float((check["all"].argmax(-1) == check["dense"].argmax(-1)).float().mean())
        print(f"exactness: all-chunks vs dense logits rel err {exact_err:.2e}, top-1 {top1:.3f}")
        summary["exactness_all_vs_dense_rel_err"] = exact_err
        summary["exactness_all_vs_dense_top1_agreement"] = top1
    summary["exactness_note"] = (
        "logits after every layer of a random bf16 model: rounding differences of the two "
        "summation orders compound layer by layer; the identity itself is tested in fp32 "
        "(tests/engine/test_moska_path.py, tests/kernels/test_shared_attention.py)"
    )
    payload = {
        "environment": environment(),
        "shapes": {
            "model": "Llama-3.1-8B dims, random bf16",
            "layers": mcfg.num_layers,
            "library_tokens": args.library_tokens,
            "chunk_size": args.chunk_size,
            "unique_tokens": args.unique_tokens,
            "top_k": args.top_k,
            "scorer": args.scorer,
            "routing_rank": args.routing_rank or "head_dim // 4",
            "block_size": bs,
        },
        "ceilings": ceilings,
        "library_build": build,
        "rows": rows,
        "router_profiles": profiles,
        "summary": summary,
    }
    check_floors(payload)
    out = write_json(args.out, payload)
    plot(rows, out.with_suffix(".png"))
    print(f"\n{'B':>5} {'mode':>6} {'step ms':>9} {'tok/s':>10} {'roofline':>9}")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['mode']:>6} {r['step_ms']:>9.2f} "
            f"{r['decode_tokens_per_s']:>10.1f} {r['roofline_fraction']:>9.2f}"
        )
    print("summary:", summary)
    raise_if_floors_broken(payload)


def capture(step):
    """One decode step captured as a CUDA graph; None when something in it cannot be."""
    try:
        return capture_graph(step)
    except Exception as e:  # noqa: BLE001 - report and time eagerly instead
        print(f"CUDA graph capture failed, timing eagerly: {e!r}"[:300], flush=True)
        torch.cuda.synchronize()
        return None


def library_build_rate(loaded, tokens: int, chunk: int, ceilings: dict, n_params: int) -> dict:
    """Prefill a prefix-mode library of `tokens` random tokens with the real builder (in
    memory: at 8B dims a library takes 128 KiB per token on disk). A short warm-up build
    first keeps Triton's compile time out of the figure."""
    from moska.library.builder import build_in_memory

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, loaded.config.vocab_size, (tokens,), generator=g).tolist()
    # the build's attention is the model's kernel table (library/prefill.py): an engine's
    loaded.model.kernels = kernel_ops("auto", DEV)  # Triton paged prefill on CUDA
    build_in_memory(loaded, [("warm", ids[:1024])], "warm", chunk_size=512, progress=False)
    lib, stats = build_in_memory(
        loaded,
        [("random", ids)],
        "bench",
        chunk_size=min(chunk, tokens),
        mode="prefix",
        progress=False,
    )
    del lib
    c = loaded.config
    flops = 2 * n_params * tokens + 2 * tokens * tokens * c.num_heads * c.head_dim * c.num_layers
    return {
        "tokens": tokens,
        "seconds_total": stats.seconds,
        "seconds_prefill": stats.prefill_seconds,
        "tokens_per_s": stats.tokens_per_s,
        "mfu": flops / stats.prefill_seconds / ceilings["gemm_flops_per_s"],
    }


if __name__ == "__main__":
    main()
