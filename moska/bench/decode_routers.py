"""Routers timed side by side in the decode benchmark (``--routers``), one library, one run.

Each name is a routing policy (and, for the default, the key-max launch's tile) in front of
the same decode step, so a router's cost is the difference between its row and ``none``:

- ``none``: no router at all; every layer reads a fixed uniform-random top-k per (request,
  KV head), drawn once before timing (the cost of the grouped step a router feeds);
- ``none_zipf``: the same with Zipf chunk popularity (weights 1 / rank^1.1 over a shuffled
  chunk order, drawn without replacement per (request, KV head): a few hot chunks read by
  many rows). The default router's own work does not depend on which chunks win (it scores
  every chunk), so its cost under Zipf is its uniform cost; this row gives the step's;
- ``two_stage_old``: the two-stage router as before issue 17 (bound shortlist of 4k chunks
  per request, key-max on it, one set of chunks per request: ``LEGACY`` + two_stage);
- ``default_before``: the default policy (key-max over every key, per KV head) with the
  key-max tile used until session 16 (``router_dense.OLD_TILE``), nothing else changed;
- ``default_torch_topk``: the default policy with ``torch.topk`` as its last step (as
  before session 17; ``router.ROW_TOPK`` False);
- ``default``: the default policy as it is now (``router_dense.TILE``, the row top-k);
- ``default_next``: the default policy with candidate tiles (``$MOSKA_NEXT_TILE``, e.g. the
  sweep's fastest per batch; a tile changes no logit and no maximum) and the one-launch
  row top-k (``router.ROW_TOPK``: the same chunks but where the k-th score ties);
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

ROUTERS = (
    "none", "none_zipf", "two_stage_old", "default_before", "default_torch_topk", "default",
    "default_next", "default_shortlist_kv",
)  # fmt: skip
FIXED = ("none", "none_zipf")  # rows without a router: fixed chunks
NEXT_TILE_ENV = "MOSKA_NEXT_TILE"  # the tiles ``default_next`` times


def next_tiles() -> tuple[tuple[int, router_dense.DenseTile], ...]:
    """The candidate tiles of the ``default_next`` row, as ``router_dense.TILES_BY_BATCH``:
    ``$MOSKA_NEXT_TILE`` is one tile (``b32n128w4s4u2``) or tiles by smallest batch
    (``0:b32n128w4s4,256:b64n128w8s3u2``); a device script sets it to its sweep's fastest.
    Unset: the current tiles."""
    import os

    spec = os.environ.get(NEXT_TILE_ENV, "").strip()
    if not spec:
        return router_dense.TILES_BY_BATCH
    out = []
    for part in spec.split(","):
        at, _, tag = part.rpartition(":")
        out.append((int(at) if at else 0, parse_tile(tag)))
    return tuple(sorted(out, key=lambda x: x[0]))


def policy_of(name: str) -> RoutingPolicy | None:
    """The routing policy a router row runs (None: no router)."""
    if name in FIXED:
        return None
    if name == "two_stage_old":
        return LEGACY.replace(scorer="two_stage")
    if name == "default_shortlist_kv":
        return RoutingPolicy(scorer="two_stage", shortlist_per_head=True)
    if name in ("default_before", "default_torch_topk", "default", "default_next"):
        return RoutingPolicy()
    raise ValueError(f"unknown router {name!r}; known: {', '.join(ROUTERS)}")


def floor_scorer(name: str) -> str:
    """What the step's floor counts for the router's own work (decode_report.step_floor)."""
    policy = policy_of(name)
    return "none" if policy is None else policy.scorer


def fixed_selections(
    batch: int,
    num_kv_heads: int,
    num_chunks: int,
    top_k: int,
    layers: int,
    device,
    seed: int = 0,
    zipf: float | None = None,
) -> list[Selections]:
    """A uniform-random top-k per (request, KV head) for each layer (what ``none`` reads);
    ``zipf`` s: drawn without replacement with weights 1 / rank^s over a shuffled chunk
    order (``none_zipf``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(layers):
        if zipf is None:
            noise = torch.rand(batch, num_kv_heads, num_chunks, generator=gen, device=device)
            idx = noise.topk(top_k, dim=-1).indices
        else:
            w = 1.0 / torch.arange(1, num_chunks + 1, device=device, dtype=torch.float32) ** zipf
            w = w[torch.randperm(num_chunks, generator=gen, device=device)]
            rows = w.expand(batch * num_kv_heads, num_chunks)
            idx = torch.multinomial(rows, top_k, replacement=False, generator=gen)
            idx = idx.view(batch, num_kv_heads, top_k)
        out.append(from_topk(idx, num_kv_heads, num_chunks))
    return out


def fixed_rows(
    routers: list[str],
    batch: int,
    num_kv_heads: int,
    num_chunks: int,
    top_k: int,
    layers: int,
    device,
) -> dict[str, list[Selections]]:
    """The fixed chunks of each no-router row among ``routers`` (``router_row``'s ``fixed``)."""
    zipf = {"none": None, "none_zipf": 1.1}
    return {
        name: fixed_selections(batch, num_kv_heads, num_chunks, top_k, layers, device,
                               zipf=zipf[name])
        for name in routers if name in FIXED
    }  # fmt: skip


@contextmanager
def router_row(
    name: str, fixed: list[Selections] | dict[str, list[Selections]] | None = None
) -> Iterator[None]:
    """Run the step under router ``name``: the tile it times, and for ``none`` /
    ``none_zipf`` the fixed selections in place of routing (a graph captured inside keeps
    them); ``fixed`` is that row's list or ``fixed_rows``' dict."""
    from moska.kernels import router

    old, old_by_batch = router_dense.TILE, router_dense.TILES_BY_BATCH
    old_topk = router.ROW_TOPK
    if name == "default_before":
        router_dense.TILE, router_dense.TILES_BY_BATCH = router_dense.OLD_TILE, ()
    elif name == "default_torch_topk":
        router.ROW_TOPK = False
    elif name == "default_next":
        router_dense.TILES_BY_BATCH = next_tiles()
        router.ROW_TOPK = True
    try:
        if name in FIXED:
            rows = fixed.get(name) if isinstance(fixed, dict) else fixed
            assert rows is not None, f"router {name!r} needs fixed selections"
            from moska.attention import shared

            def route_group(ops, layer, q_rows, group, sm_scale, keymax_programs=None):
                return rows[layer]

            with mock.patch.object(shared, "route_group", route_group):
                yield
        else:
            yield
    finally:
        router_dense.TILE, router_dense.TILES_BY_BATCH = old, old_by_batch
        router.ROW_TOPK = old_topk


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


def parse_tile(tag: str) -> router_dense.DenseTile:
    """``b32n128w4s4`` -> DenseTile(32, 128, 4, 4); ``b32n128w4s4u2``: two key blocks per
    loop iteration."""
    import re

    m = re.fullmatch(r"b(\d+)n(\d+)w(\d+)s(\d+)(?:u(\d+))?", tag)
    if m is None:
        raise ValueError(f"a tile is spelled bBnNwWsS[uU] (e.g. b32n128w4s4u2), got {tag!r}")
    return router_dense.DenseTile(*(int(g) for g in m.groups() if g is not None))


if __name__ == "__main__":  # the tile sweep (before session 17 it lived here)
    from moska.bench.router_tile_sweep import main

    main()
