"""Tiles the FP8 attention benchmark (`moska.bench.fp8_attention`) tries per variant: the
launcher's defaults ({}) and alternatives, with what each was chosen on."""

from __future__ import annotations

from typing import Any

# FP8 tensor-core tiles (e4m3 halves shared memory per stage): on the H200 only 64 x 128, 4
# warps, 3 stages was good for fp8_mma_vt (fp8_attention_h200_mma.json; 128 rows 4-6 ms)
MMA_TILES: list[dict[str, Any]] = [
    {},
    *(
        {"block_m": 64, "block_n": n, "num_warps": w, "num_stages": st}
        for n, w, st in (
            (128, 4, 3), (128, 4, 2), (128, 4, 4), (128, 8, 3),
            (64, 4, 3), (64, 4, 4), (64, 8, 3),
        )
    ),
]  # fmt: skip
# --quick-tiles (a < 150 s device run): the winner and neighbours, and a 128-row tile again
# (B = 1,024 has ~128 rows a group: one tile reads the chunk once)
QUICK_MMA_TILES: list[dict[str, Any]] = [
    {"block_m": m, "block_n": n, "num_warps": w, "num_stages": st}
    for m, n, w, st in ((64, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 2))
]  # the first: library/fp8_mma.MMA_TILE, what the engine launches (and the check runs)
# --quick-tiles from session 17, every tensor-core variant: the first tile above (what the
# engine launches), its key loop warp-specialized, and 256-key blocks (per-token scales pay
# per key block: 64-key blocks cost them 2x at B = 1,024, fp8_attention_h200_session16b.json;
# there the other quick tiles, a persistent grid and 128-row tiles never won)
QUICK_WIDE: list[dict[str, Any]] = [
    {**QUICK_MMA_TILES[0], "warp_specialize": True},
    {"block_m": 64, "block_n": 256, "num_warps": 8, "num_stages": 2},
]
# alternatives to the launcher's defaults ({}): the tiles that won a variant on the H200
# (bench/results/fp8_attention_h200_*_scales.json)
TILES: list[dict[str, Any]] = [
    {},
    {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3},
    {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3},
]
