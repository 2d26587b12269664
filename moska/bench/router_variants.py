"""The routers the routing-cost benchmarks time (`router_overlap.py`, `router_corun.py`), by
name: the default policy (key-max over every key, per KV head) as it is, with its grid
capped, or with another key-max tile, and the two-stage router. Every variant of the default
computes the same scores (the tile and the grid do not change a logit; the max is exact)."""

from __future__ import annotations

import torch

from moska.kernels import router, router_dense

# default_p{n}: the default with its key-max grid capped at n programs per SM (the same
# scores; room on every SM for the unique attention beside it); default_p{n}_b{B}w{W}s{S}:
# that with the key-max tile of B requests, W warps, S stages (128-key blocks)
ROUTERS = ("default", "default_p1", "default_p2", "two_stage")


def _parse_default(name: str) -> tuple[int | None, router_dense.DenseTile | None]:
    """default[_p{n}[_b{B}w{W}s{S}]] -> (programs per SM or None, tile or None)."""
    parts = name.split("_")[1:]
    per_sm = int(parts[0].removeprefix("p")) if parts else None
    tile = None
    if len(parts) > 1:
        bb, rest = parts[1].removeprefix("b").split("w")
        nw, ns = rest.split("s")
        tile = router_dense.DenseTile(int(bb), 128, int(nw), int(ns))
    return per_sm, tile


def two_stage_options(name: str) -> dict[str, int]:
    """two_stage[_p{n}][_f{n}] -> {"p": n, "f": n} (those given)."""
    opts = {p[0]: int(p[1:]) for p in name.split("_")[2:] if p[1:].isdigit()}
    if len(opts) != len(name.split("_")[2:]) or set(opts) - {"p", "f"}:
        raise ValueError(f"two_stage options are _p{{n}} and _f{{n}}, got {name!r}")
    return opts


def route_fn(name: str, q, index, topk: int, factor: int = 4):
    if name.startswith("default"):
        per_sm, tile = _parse_default(name)
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 2
        progs = None if per_sm is None else per_sm * sms

        def run():
            old = router_dense.TILES_BY_BATCH
            if tile is not None:  # read at call time (tile_for), so a graph captures it
                router_dense.TILES_BY_BATCH = ((0, tile),)
            try:
                return router.route(
                    q, index, topk, "keymax", per_kv_head=True, keymax_programs=progs
                )
            finally:
                router_dense.TILES_BY_BATCH = old

        return run
    if name == "two_stage" or name.startswith("two_stage_"):
        # two_stage_p{n}: its key-max grid capped at n programs per SM (room beside it);
        # two_stage_f{n}: a shortlist of n x top-k chunks (changes the choices)
        opts = two_stage_options(name)
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 2
        progs = opts["p"] * sms if "p" in opts else None
        f_ = opts.get("f", factor)
        return lambda: router.route(
            q, index, topk, "two_stage", shortlist_factor=f_, keymax_programs=progs
        )
    raise ValueError(
        f"router must be default[_p{{n}}[_b{{B}}w{{W}}s{{S}}]] or two_stage[_p{{n}}][_f{{n}}], "
        f"got {name!r}"
    )
