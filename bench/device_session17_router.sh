#!/usr/bin/env bash
# Session 17, #17 routing cost (one H200, < 150 s): can the DEFAULT router (key-max over every
# low-rank key, per KV head; tensor-core bound: 2 B Hq S r FLOPs, 3.9-4.0 of its 4.1 ms at
# B = 1,024 in session 16) run closer to its own floor, with the same chunks?
# 1) CUDA tests: candidate key-max tiles (two key blocks per loop iteration, 16-request tiles)
#    at 8B dims, bf16 pool: their scores vs the current tile's and the fp32 reference's, the
#    chunks vs the current tile's (exact) and the reference's top-k (share printed); the
#    one-launch row top-k (router_topk) vs its reference and torch.topk; session 16's tests;
# 2) the scores alone per tile at B = 64 / 256 / 1,024 (one layer, 1M keys, 4,096-key
#    chunks, CUDA graphs, 5 rotated rounds; the first tile is the current one), each with
#    the router's own floor (bytes of the fp16 low-rank keys + q + scores over a read-only
#    stream, FLOPs over the measured GEMM peak; both in this run), the top-8 chunks vs the
#    current tile's and the fp32 reference's; torch.topk vs the row top-k on the scores
#    (times, agreement); picks the fastest tile per batch that picks the current's chunks;
# 3) `moska.bench.decode --routers`: the decode step at B = 64 / 256 / 1,024, 8B dims
#    (4 layers), 1M shared tokens, 4,096-token chunks, top-8, CUDA graphs, one library: no
#    router (uniform and Zipf fixed chunks), the default now, the default with the picked
#    tiles and the row top-k (default_next); each router alone; floors from a read-only
#    stream in the same run; 4) in the time left, the kernels bench's router rows at
#    B = 1,024 (the grouped step with the default in front against its floor).
# Carry .whl-min (or .whl). JSON: $OUT/router_tiles_session17.json,
# $OUT/decode_routers_session17.json; table last.
# `bash bench/device_session17_router.sh --cpu-dry-run`: the same steps in CPU forms.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
TILES="b32n128w4s4 b32n128w4s4u2 b32n64w4s4 b32n64w4s4u2 b16n128w4s4 b16n128w4s4u2 b16n256w4s3"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1; DRY=1
  TESTS="tests/routing/test_router_unroll.py tests/kernels/test_router_topk.py"; TT=200
  LEFT=1200  # the interpreter is slow
  TILES="b32n128w4s4 b16n16w4s2u2"
  SARGS="--cpu-dry-run"; DARGS="--cpu-dry-run"
else
  PY=python3; export TRITON_INTERPRET=0; DRY=""
  WHL=.whl-min; [ -d "$WHL" ] || WHL=.whl
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_router17 "$WHL"/*.whl
  export PYTHONPATH=/tmp/site_router17:$PWD
  TESTS="-m cuda tests/routing/test_router_unroll.py tests/kernels/test_router_topk.py"
  TESTS="$TESTS tests/routing/test_router_cost.py"; TT=40
  SARGS="--batch 64 256 1024 --rounds 5"
  DARGS="--batch 64 256 1024 --library-tokens 1048576 --layers 4 --iters 5 --cuda-graph"
  LEFT=145
fi
# shellcheck disable=SC2086
timeout $TT $PY -m pytest -q -s -p no:cacheprovider -rs $TESTS > "$OUT/router_tests.log" 2>&1
echo "router tests rc=$? ($(( $(date +%s) - T0 )) s)"
grep -E "^tile |^row top-k|passed|failed|Error" "$OUT/router_tests.log" | tail -7 | cut -c1-300
# 2) the tile sweep (the first tile is the current one); its pick goes to 3) as default_next
TS=$(( LEFT - ($(date +%s) - T0) )); [ -z "$DRY" ] && [ $TS -gt 45 ] && TS=45
# shellcheck disable=SC2086
timeout $TS $PY -m moska.bench.router_tile_sweep $SARGS --tiles $TILES --top-k 8 \
  --out "$OUT/router_tiles_session17.json" --next-tile-out "$OUT/next_tile.txt" \
  > "$OUT/router_tiles.log" 2>&1
echo "tile sweep rc=$? ($(( $(date +%s) - T0 )) s)"
grep -E "^tile|^topk" "$OUT/router_tiles.log" | cut -c1-150
NEXT=$(cat "$OUT/next_tile.txt" 2>/dev/null || echo "")
echo "default_next tiles: ${NEXT:-none picked (the current tile)}"
export MOSKA_NEXT_TILE="$NEXT"
# 3) the decode step with each router
TD=$(( LEFT - ($(date +%s) - T0) - 8 )); [ -z "$DRY" ] && [ $TD -gt 60 ] && TD=60
# shellcheck disable=SC2086
timeout $TD $PY -m moska.bench.decode $DARGS --routers none none_zipf default default_next \
  --modes moska --chunk-size 4096 --top-k 8 --build-tokens 0 \
  --out "$OUT/decode_routers_session17.json" > "$OUT/decode_routers.log" 2>&1
echo "decode routers rc=$? ($(( $(date +%s) - T0 )) s)"
grep -E "Error|error" "$OUT/decode_routers.log" | tail -3 | cut -c1-300
# 4) in the time left, the issue's own measure (kernels bench, the tile and top-k in use):
# the grouped step alone and with the default in front, against its floor, B = 1,024
TK=$(( LEFT - ($(date +%s) - T0) ))
if [ -z "$DRY" ] && [ $TK -ge 35 ]; then
  timeout $TK $PY -m moska.bench.kernels --routers-only --router-ranks 32 --batch 1024 \
    --out "$OUT" > "$OUT/kernels_routers.log" 2>&1
  echo "kernels routers rc=$? ($(( $(date +%s) - T0 )) s)"
  $PY -c "
import json; s = json.load(open('$OUT/kernels_routers.json'))['summary']
print({k: round(v, 3) for k, v in s.items() if k.endswith('b1024') and isinstance(v, float)})
" 2>&1 | cut -c1-400
fi
$PY - "$OUT/decode_routers_session17.json" "$OUT/router_tiles_session17.json" <<'PY'
import json, sys
f = lambda x, n=2: "-" if x is None else f"{x:.{n}f}"
try:
    t = json.load(open(sys.argv[2]))["summary"]
    for b in sorted(int(k.rsplit("_b", 1)[1]) for k in t if k.startswith("router_floor_ms")):
        g = lambda key, n=3: f(t.get(f"{key}_b{b}"), n)
        best = t.get(f"best_tile_b{b}")
        print(f"B={b}: router floor {g('router_floor_ms')} ms; best {best} "
              f"{f(t.get(f'{best}_b{b}_ms'), 3)} ms ({f(t.get(f'{best}_b{b}_floor_fraction'), 3)}"
              f" of floor, x{g('speedup_best_over_first')}) | topk torch {g('torch_topk_ms')} "
              f"row {g('row_topk_ms')} ms, equal {g('topk_rows_equal_to_torch_topk', 4)} | "
              f"fp32 ref rows {g('first_tile_rows_equal_to_fp32_reference', 4)}, clear of ties "
              f"{g('rows_clear_of_ties', 4)} (equal {g('clear_rows_equal_to_fp32_reference', 4)})")
except Exception as e:  # noqa: BLE001
    print(f"no tile JSON ({e})")
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    sys.exit(f"no decode JSON ({e})")
print("read GB/s", f(d["ceilings"].get("read_bytes_per_s", 0) / 1e9, 0), "| GEMM TFLOP/s",
      f(d["ceilings"].get("gemm_flops_per_s", 0) / 1e12, 0), "| layers", d["shapes"]["layers"])
for p in d.get("router_profiles") or []:
    top = ", ".join(f"{k['name'][:24]} x{k['launches']} {k['device_us']:.0f}us"
                    for k in p["kernels"][:3])
    print(f"profile {p['router']} B={p['batch']}: device {p['device_us']:.0f} us: {top}"[:200])
print(f"{'B':>5} {'router':<13} {'step ms':>8} {'alone ms':>8} {'cost ms':>8} "
      f"{'frac(unrouted floor)':>20} {'frac(own floor)':>15}")
none = {r["batch"]: r["step_ms"] for r in d["rows"] if r["mode"] == "moska:none"}
for r in d["rows"]:
    cost = r["step_ms"] - none[r["batch"]] if r["batch"] in none else None
    print(f"{r['batch']:>5} {r['mode'][6:]:<13} {f(r['step_ms']):>8} "
          f"{f(r.get('router_alone_ms'), 3):>8} {f(cost):>8} "
          f"{f(r.get('unrouted_floor_fraction'), 3):>20} {f(r.get('roofline_fraction'), 3):>15}")
PY
