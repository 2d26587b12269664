"""Routers timed side by side in the decode benchmark (``--routers``), one library, one run.

Each name is a routing policy (and, for the default, the key-max launch's tile) in front of
the same decode step, so a router's cost is the difference between its row and ``none``:

- ``none``: no router at all; every layer reads a fixed uniform-random top-k per (request,
  KV head), drawn once before timing (the cost of the grouped step a router feeds);
- ``two_stage_old``: the two-stage router as before issue 17 (bound shortlist of 4k chunks
  per request, key-max on it, one set of chunks per request: ``LEGACY`` + two_stage);
- ``default_before``: the default policy (key-max over every key, per KV head) with the
  key-max tile used until session 16 (``router_dense.OLD_TILE``);
- ``default``: the default policy as it is now (``router_dense.TILE``);
- ``default_shortlist_kv``: key-max on each KV head's own bound shortlist of 4k chunks
  (``RoutingPolicy.shortlist_per_head``; a study knob, not the default: it changes which
  chunks are chosen where a needle's chunk falls off its head's shortlist).

``router_alone`` times one layer's routing by itself (a CUDA graph) and ``profile_router``
lists what one eager call launches (kernels, counts, device time) and its host time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import torch

from moska.kernels import router_dense
from moska.kernels.selections import Selections, from_topk
from moska.routing.policy import LEGACY, RoutingPolicy

ROUTERS = ("none", "two_stage_old", "default_before", "default", "default_shortlist_kv")


def policy_of(name: str) -> RoutingPolicy | None:
    """The routing policy a router row runs (None: no router)."""
    if name == "none":
        return None
    if name == "two_stage_old":
        return LEGACY.replace(scorer="two_stage")
    if name == "default_shortlist_kv":
        return RoutingPolicy(scorer="two_stage", shortlist_per_head=True)
    if name in ("default_before", "default"):
        return RoutingPolicy()
    raise ValueError(f"unknown router {name!r}; known: {', '.join(ROUTERS)}")


def floor_scorer(name: str) -> str:
    """What the step's floor counts for the router's own work (decode_report.step_floor)."""
    policy = policy_of(name)
    return "none" if policy is None else policy.scorer


def fixed_selections(
    batch: int, num_kv_heads: int, num_chunks: int, top_k: int, layers: int, device, seed: int = 0
) -> list[Selections]:
    """A uniform-random top-k per (request, KV head) for each layer (what ``none`` reads)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(layers):
        noise = torch.rand(batch, num_kv_heads, num_chunks, generator=gen, device=device)
        out.append(from_topk(noise.topk(top_k, dim=-1).indices, num_kv_heads, num_chunks))
    return out


@contextmanager
def router_row(name: str, fixed: list[Selections] | None = None) -> Iterator[None]:
    """Run the step under router ``name``: the tile it times, and for ``none`` the fixed
    selections in place of routing (a graph captured inside keeps them)."""
    old = router_dense.TILE
    router_dense.TILE = router_dense.OLD_TILE if name == "default_before" else old
    try:
        if name == "none":
            assert fixed is not None, "router 'none' needs fixed selections"
            from moska.attention import shared

            def route_group(ops, layer, q_rows, group, sm_scale, keymax_programs=None):
                return fixed[layer]

            with mock.patch.object(shared, "route_group", route_group):
                yield
        else:
            yield
    finally:
        router_dense.TILE = old


def route_once(q: torch.Tensor, lib, top_k: int, name: str, sm_scale: float) -> Selections:
    from moska.routing import select_chunks

    policy = policy_of(name)
    assert policy is not None
    return select_chunks(q, lib, 0, top_k, policy, sm_scale)


def router_alone(q: torch.Tensor, lib, top_k: int, name: str, sm_scale: float, graph) -> dict:
    """Milliseconds of one layer's routing (layer 0) at q's batch, as a CUDA graph when
    ``graph`` (moska.bench.decode.capture) gives one, else eager."""
    from moska.bench.common import time_ms

    if policy_of(name) is None:
        return {"router_alone_ms": 0.0}
    with router_row(name):

        def fn():
            return route_once(q, lib, top_k, name, sm_scale)

        replay = graph(fn) if q.is_cuda else None
        return {"router_alone_ms": time_ms(replay or fn, iters=10, warmup=2)}


def profile_router(q: torch.Tensor, lib, top_k: int, name: str, sm_scale: float) -> dict:
    """What one eager routing call of layer 0 does: its kernels (name, launches, device
    microseconds), the launch count, the host's microseconds per call (the Python and
    launch work of 20 calls, then one sync; 2 on CPU) and whether the call syncs with the device."""
    from torch.profiler import ProfilerActivity, profile

    with router_row(name):
        route_once(q, lib, top_k, name, sm_scale)  # compiled and warm
        if q.is_cuda:
            torch.cuda.synchronize()
        calls = 20 if q.is_cuda else 2  # the interpreter's calls take seconds
        t0 = time.perf_counter()
        for _ in range(calls):
            route_once(q, lib, top_k, name, sm_scale)
        host_us = (time.perf_counter() - t0) / calls * 1e6
        if q.is_cuda:
            torch.cuda.synchronize()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if q.is_cuda else [])
        with profile(activities=acts) as prof:
            route_once(q, lib, top_k, name, sm_scale)
            if q.is_cuda:
                torch.cuda.synchronize()
    kernels, api_launches = [], 0
    for e in prof.key_averages():
        dev_us = float(getattr(e, "device_time_total", None) or 0.0)
        own_cpu = float(getattr(e, "self_cpu_time_total", None) or 0.0)
        if dev_us > 0 and own_cpu == 0:  # a device kernel row, not a CPU op around it
            kernels.append({"name": e.key[:120], "launches": e.count, "device_us": dev_us})
        elif "LaunchKernel" in e.key:  # cudaLaunchKernel, cuLaunchKernelEx (Triton)
            api_launches += e.count
    kernels.sort(key=lambda k: -k["device_us"])
    syncs = None
    if q.is_cuda:  # does the call wait for the device anywhere? (sync debug mode raises)
        with router_row(name):
            torch.cuda.set_sync_debug_mode("error")
            try:
                route_once(q, lib, top_k, name, sm_scale)
                syncs = False
            except RuntimeError:
                syncs = True
            finally:
                torch.cuda.set_sync_debug_mode(0)
    return {
        "router": name,
        "batch": q.shape[0],
        "kernels": kernels,
        "launches": sum(k["launches"] for k in kernels),
        "launch_calls": api_launches,
        "device_us": sum(k["device_us"] for k in kernels),
        "host_us_per_call": host_us,
        "host_sync": syncs,
    }


def routers_summary(rows: list[dict], profiles: list[dict]) -> dict:
    """Per batch and router: the step, the router's cost (its step less the no-router
    step, and alone), the floor fractions; the profiles' launch counts and host time."""
    out: dict = {}
    for r in rows:
        if not r["mode"].startswith("moska:"):
            continue
        name, b = r["mode"][6:], r["batch"]
        none = next((x for x in rows if x["batch"] == b and x["mode"] == "moska:none"), None)
        out[f"{name}_step_ms_b{b}"] = r["step_ms"]
        out[f"{name}_alone_ms_b{b}"] = r.get("router_alone_ms")
        out[f"{name}_unrouted_floor_fraction_b{b}"] = r.get("unrouted_floor_fraction")
        out[f"{name}_roofline_fraction_b{b}"] = r.get("roofline_fraction")
        if none is not None:
            out[f"{name}_cost_ms_b{b}"] = r["step_ms"] - none["step_ms"]
    for p in profiles:
        tag = f"{p['router']}_b{p['batch']}"
        out[f"{tag}_launches"] = p["launches"]
        out[f"{tag}_host_us_per_call"] = p["host_us_per_call"]
    return out


def tile_sweep(
    batches: list[int], tiles: list[str], tokens: int, chunk: int, dev: str, rounds: int = 1
) -> list:
    """The default router's key-max scores alone (one layer of 8B dims: Hq 32, Hkv 8,
    D 128, rank 32, random keys) per tile ``bBnNwWsS``, CUDA-graph timed; each tile's
    scores against the current tile's (bitwise equal, or the largest difference).
    ``rounds`` > 1 times every tile once per round, the order rotated each round (so a
    drift of the GPU's clock during the sweep does not favour the first tile), and reports
    the median of the rounds."""
    from moska.bench.common import LLAMA_3_1_8B, capture_graph, time_ms
    from moska.kernels.router import build_routing_index

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
        base = router_dense.keymax_dense_scores(*args)
        runs, seen = {}, {}
        for tag in tiles:
            tile = parse_tile(tag)
            out = torch.empty_like(base)

            def fn(tile=tile, out=out, args=args):
                out.copy_(router_dense.keymax_dense_scores(*args, *tile))

            fn()
            seen[tag] = (bool(torch.equal(out, base)), float((out - base).abs().max()))
            runs[tag] = (capture_graph(fn) if dev == "cuda" else None) or fn
        times: dict[str, list[float]] = {tag: [] for tag in tiles}
        for r in range(rounds):
            for tag in tiles[r % len(tiles) :] + tiles[: r % len(tiles)]:
                times[tag].append(time_ms(runs[tag], iters=10 if dev == "cuda" else 1, warmup=1))
        flops = 2 * b * hq * tokens * index.rank
        for tag in tiles:
            ms = sorted(times[tag])[len(times[tag]) // 2]
            equal, diff = seen[tag]
            rows.append({"batch": b, "tile": tag, "ms": ms, "ms_rounds": times[tag],
                         "tflops": flops / ms / 1e9, "equal_to_default_tile": equal,
                         "max_abs_diff": diff})  # fmt: skip
            print(f"tile {tag:14s} B={b:5d} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s "
                  f"equal={equal} rounds {' '.join(f'{t:.3f}' for t in times[tag])}",
                  flush=True)  # fmt: skip
    return rows


def parse_tile(tag: str) -> router_dense.DenseTile:
    """``b32n128w4s4`` -> DenseTile(32, 128, 4, 4)."""
    import re

    m = re.fullmatch(r"b(\d+)n(\d+)w(\d+)s(\d+)", tag)
    if m is None:
        raise ValueError(f"a tile is spelled bBnNwWsS (e.g. b32n128w4s4), got {tag!r}")
    return router_dense.DenseTile(*map(int, m.groups()))


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
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny, on CPU (interpreter)")
    args = ap.parse_args(argv)
    dev = "cpu" if args.cpu_dry_run else "cuda"
    if args.cpu_dry_run:
        args.batch, args.tokens, args.chunk_size = [4], 256, 128
    rows = tile_sweep(args.batch, args.tiles, args.tokens, args.chunk_size, dev, args.rounds)
    best = {b: min((r for r in rows if r["batch"] == b), key=lambda r: r["ms"]) for b in args.batch}
    summary = {f"best_tile_b{b}": r["tile"] for b, r in best.items()}
    summary.update({f"{r['tile']}_ms_b{r['batch']}": r["ms"] for r in rows})
    write_json(args.out, {"environment": environment(), "default_tile": list(router_dense.TILE),
                          "tokens": args.tokens, "chunk_size": args.chunk_size, "rows": rows,
                          "summary": summary})  # fmt: skip


if __name__ == "__main__":
    main()
