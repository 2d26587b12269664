"""What the FP8 attention benchmark (`moska.bench.fp8_attention`) times: the FP8 tensor-core
program's variants (their launch keywords and flags) and the tiles tried per variant (the
launcher's defaults ({}) and alternatives, with what each was chosen on)."""

from __future__ import annotations

from typing import Any

from moska.library.fp8 import BLOCK_ROWS

# tensor-core time of a variant's two products vs bf16's (FP8 MMA runs at 2x the bf16
# rate on Hopper; qsplit: two FP8 QK^T dots, one PV): the compute floor's FLOPs factor
MMA_COST = {"fp8_mma": 0.5, "fp8_mma_vt": 0.5, "fp8_dot": 0.75}
MMA_COST.update(fp8_mma_qsplit=0.75, fp8_mma_qsplit_vt=0.75, fp8_mma_vt_chunk=0.5)
MMA_COST.update(fp8_mma_vt_v1=0.5, fp8_mma_vt_chunk_scaled=0.5, fp8_mma_vt_block=0.5)
# fp8_mma (shared_attention_fp8.py): q per row and the weights in e4m3, no KV tile upcast;
# _vt: V read token-major (a transposed copy); _qsplit: q as two e4m3 terms (two QK^T dots)
MMA: dict[str, dict[str, Any]] = {"fp8_mma": {}, "fp8_mma_vt": {"v_t": True}}
MMA.update(
    fp8_mma_qsplit={"fp8_q_split": True}, fp8_mma_qsplit_vt={"fp8_q_split": True, "v_t": True}
)
# _chunk: per-(chunk, KV head) scales (what per-token ones cost); A/Bs in one run of the
# program's session-16 forms against the former code: _v1 (per-token, TOKEN_V2 off),
# _chunk_scaled (RAW_MAX off)
MMA.update(fp8_mma_vt_chunk={"v_t": True}, fp8_mma_vt_v1={"v_t": True, "token_v2": False})
MMA.update(fp8_mma_vt_chunk_scaled={"v_t": True, "raw_max": False})
# _block: library/fp8.py "block" scales (per 128 rows from a chunk's start), one per key block
MMA.update(fp8_mma_vt_block={"v_t": True, "fp8_scale_block": BLOCK_ROWS})
# session 17: q split in its accumulating form (QSPLIT_ACC, the default) vs the former one
# (_v16: residual 16x up, two multiplies per score), and RAW_MAX with per-token scales (_raw)
MMA.update(fp8_mma_qsplit_vt_v16={"fp8_q_split": True, "v_t": True, "qsplit_acc": False})
MMA.update(fp8_mma_qsplit_vt_raw={"fp8_q_split": True, "v_t": True, "raw_max_token": True})
# the session-17 call-1 A/Bs as measured (then the defaults were SC_NOMASK on, RAW_MAX_TOKEN
# off): _raw RAW_MAX_TOKEN on, _mask SC_NOMASK off; now the defaults are those two, and the
# A/Bs _noraw (RAW_MAX_TOKEN off) and _nomask (SC_NOMASK on)
MMA["fp8_mma_qsplit_vt_raw"]["sc_nomask"] = True
MMA.update(fp8_mma_qsplit_vt_mask={"fp8_q_split": True, "v_t": True, "raw_max_token": False})
MMA.update(fp8_mma_qsplit_vt_noraw={"fp8_q_split": True, "v_t": True, "raw_max_token": False})
MMA.update(fp8_mma_qsplit_vt_nomask={"fp8_q_split": True, "v_t": True, "sc_nomask": True})
# A/B and reference variants: timed at the engine's tile only (the first quick tile)
AB_ONLY: tuple[str, ...] = ("fp8_mma_qsplit_vt_v16", "fp8_mma_qsplit_vt_raw")
AB_ONLY += ("fp8_mma_qsplit_vt_mask", "fp8_mma_qsplit_vt_noraw", "fp8_mma_qsplit_vt_nomask")
AB_ONLY += ("fp8_mma_vt", "fp8_mma_vt_chunk")  # the references: their best tile is known
# one side's scales per block of 128 rows, the other's per token (fp8_quality.py "kt_vb" /
# "kb_vt"): _kb K per block (folded into the row scale), _vb V per block (weights from exp2)
MMA.update(
    fp8_mma_qsplit_vt_kb={"fp8_q_split": True, "v_t": True, "fp8_scale_block": BLOCK_ROWS},
    fp8_mma_qsplit_vt_vb={"fp8_q_split": True, "v_t": True, "fp8_scale_block": BLOCK_ROWS},
)
MMA["fp8_mma_qsplit_vt_kb"]["scale_sides"] = 1
MMA["fp8_mma_qsplit_vt_vb"]["scale_sides"] = 2
# _vb with one-term q (the layers `mma_qsplit_late` leaves unsplit) and with SC_NOMASK (A/B)
MMA["fp8_mma_vt_vb"] = {"v_t": True, "fp8_scale_block": BLOCK_ROWS, "scale_sides": 2}
MMA["fp8_mma_qsplit_vt_vb_nomask"] = {**MMA["fp8_mma_qsplit_vt_vb"], "sc_nomask": True}
MMA_COST.update(fp8_mma_qsplit_vt_v16=0.75, fp8_mma_qsplit_vt_raw=0.75, fp8_mma_qsplit_vt_mask=0.75)
MMA_COST.update(fp8_mma_qsplit_vt_kb=0.75, fp8_mma_qsplit_vt_vb=0.75, fp8_mma_vt_vb=0.5)
MMA_COST.update(fp8_mma_qsplit_vt_noraw=0.75, fp8_mma_qsplit_vt_nomask=0.75)
MMA_COST.update(fp8_mma_qsplit_vt_vb_nomask=0.75)
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
# engine launches) and 256-key blocks (per-token scales pay per key block: 64-key blocks cost
# them 2x at B = 1,024, fp8_attention_h200_session16b.json; there the other quick tiles, a
# persistent grid and 128-row tiles never won, the key loop warp-specialized 1.6 %)
# Measured (fp8_attention_h200_session17.json): 256-key blocks 4.3 ms (vs 1.66; for block
# scales they do not compile: 128 rows a scale), warp-specialized within +-3 %: from then on
# the engine's tile only
QUICK_WIDE: list[dict[str, Any]] = []
# alternatives to the launcher's defaults ({}): the tiles that won a variant on the H200
# (bench/results/fp8_attention_h200_*_scales.json)
TILES: list[dict[str, Any]] = [
    {},
    {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3},
    {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3},
]
# session 18: the weights' exp2 in f16, two per instruction (EX2_F16, `_pexp2`), on the
# quality-kept program and on one-term q with V (and K) per block
for _n in ("fp8_mma_qsplit_vt_vb", "fp8_mma_vt_vb", "fp8_mma_vt_block", "fp8_mma_vt_chunk"):
    MMA[f"{_n}_ex16"] = {**MMA[_n], "ex2_f16": True}
    MMA_COST[f"{_n}_ex16"] = MMA_COST[_n]
