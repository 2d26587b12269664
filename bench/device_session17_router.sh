#!/usr/bin/env bash
# Session 17, #17 routing cost (one H200, < 150 s), call 2. Call 1 (router_tiles_h200_session17
# .json): no candidate key-max tile beat the current one (two key blocks per iteration spill:
# 2.7x slower at 32 x 128; 16-request and 256-key tiles 10-60% slower), the kernel runs at
# 0.63 / 0.74 / 0.68 of its own floor (FLOPs over the GEMM peak) at B = 64 / 256 / 1,024; the
# one-launch row top-k is 1.9-5.5x torch.topk with the same chunks, now the default
# (router.ROW_TOPK); the decode rows moved by GPU clock drift more than the top-k saves.
# 1) CUDA tests: the row top-k vs its reference and torch.topk (ties), the unroll-2 tiles vs
#    the current tile and the fp32 reference, session 16's router tests;
# 2) per B = 64 / 256 / 1,024 (one layer, 1M keys, 4,096-key chunks, top-8, CUDA graphs, 7
#    rounds, order alternated): the whole routing call with torch.topk vs the row top-k
#    (same chosen triples?), the top-k alone, the key-max scores at the current tile and
#    3 stages, the router's own floor (bytes over a read-only stream, FLOPs over the GEMM
#    peak, this run), the chunks vs the fp32 reference (rows clear of fp16 ties must match);
# 3) `moska.bench.decode --routers`: the decode step at B = 64 / 256 / 1,024, 8B dims
#    (4 layers), 1M shared tokens, 4,096-token chunks, top-8, CUDA graphs: no router
#    (uniform and Zipf fixed chunks), the default with torch.topk (before), the default now;
#    then again in the reverse order (clock drift shows as a disagreement of the two passes);
# 4) in the time left, the kernels bench's router rows at B = 1,024 (the issue's measure).
# Carry .whl-min (or .whl). JSON: $OUT/router_tiles_session17b.json,
# $OUT/decode_routers_session17b.json, $OUT/decode_routers_session17b_rev.json; table last.
# `bash bench/device_session17_router.sh --cpu-dry-run`: the same steps in CPU forms.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
TILES="b32n128w4s4 b32n128w4s3"  # first: the current
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1; DRY=1
  TESTS="tests/routing/test_router_unroll.py tests/kernels/test_router_topk.py"; TT=200
  LEFT=1200  # the interpreter is slow
  TILES="b32n128w4s4 b16n16w4s2u2"; TS2=600
  SARGS="--cpu-dry-run"; DARGS="--cpu-dry-run"
else
  PY=python3; export TRITON_INTERPRET=0; DRY=""
  WHL=.whl-min; [ -d "$WHL" ] || WHL=.whl
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_router17 "$WHL"/*.whl
  export PYTHONPATH=/tmp/site_router17:$PWD
  TESTS="-m cuda tests/kernels/test_router_topk.py tests/routing/test_router_unroll.py"
  TESTS="$TESTS tests/routing/test_router_cost.py"; TT=35
  SARGS="--batch 64 256 1024 --rounds 7"; TS2=40
  DARGS="--batch 64 256 1024 --library-tokens 1048576 --layers 4 --iters 5 --cuda-graph"
  LEFT=145
fi
# shellcheck disable=SC2086
timeout $TT $PY -m pytest -q -s -p no:cacheprovider -rs $TESTS > "$OUT/router_tests.log" 2>&1
echo "router tests rc=$? ($(( $(date +%s) - T0 )) s)"
grep -E "^tile |^row top-k|passed|failed|Error" "$OUT/router_tests.log" | tail -7 | cut -c1-300
# 2) the routing call A/B, the top-k alone, the scores per tile, the floors
# shellcheck disable=SC2086
timeout $TS2 $PY -m moska.bench.router_tile_sweep $SARGS --tiles $TILES --top-k 8 \
  --out "$OUT/router_tiles_session17b.json" > "$OUT/router_tiles.log" 2>&1
echo "routing A/B + tiles rc=$? ($(( $(date +%s) - T0 )) s)"
grep -E "^tile|^topk" "$OUT/router_tiles.log" | cut -c1-240
# 3) the decode step with each router, then the routed rows again in the reverse order
TD=$(( LEFT - ($(date +%s) - T0) - 45 )); [ -z "$DRY" ] && [ $TD -gt 50 ] && TD=50
# shellcheck disable=SC2086
timeout $TD $PY -m moska.bench.decode $DARGS --routers none none_zipf default_torch_topk \
  default --modes moska --chunk-size 4096 --top-k 8 --build-tokens 0 \
  --out "$OUT/decode_routers_session17b.json" > "$OUT/decode_routers.log" 2>&1
echo "decode routers rc=$? ($(( $(date +%s) - T0 )) s)"
grep -E "Error|error" "$OUT/decode_routers.log" | tail -3 | cut -c1-300
TR=$(( LEFT - ($(date +%s) - T0) - 3 )); [ -z "$DRY" ] && [ $TR -gt 35 ] && TR=35
if [ $TR -ge 25 ]; then
  # shellcheck disable=SC2086
  timeout $TR $PY -m moska.bench.decode $DARGS --routers default default_torch_topk none \
    --modes moska --chunk-size 4096 --top-k 8 --build-tokens 0 \
    --out "$OUT/decode_routers_session17b_rev.json" > "$OUT/decode_routers_rev.log" 2>&1
  echo "decode routers, reverse order rc=$? ($(( $(date +%s) - T0 )) s)"
fi
# 4) in the time left, the issue's own measure with the default as it is now (row top-k):
# the grouped step alone and with each router in front, against its floor, B = 1,024
TK=$(( LEFT - ($(date +%s) - T0) ))
if [ -z "$DRY" ] && [ $TK -ge 30 ]; then
  timeout $TK $PY -m moska.bench.kernels --routers-only --router-ranks 32 --batch 1024 \
    --out "$OUT" > "$OUT/kernels_routers.log" 2>&1
  echo "kernels routers rc=$? ($(( $(date +%s) - T0 )) s)"
  $PY -c "
import json; s = json.load(open('$OUT/kernels_routers.json'))['summary']
print({k: round(v, 3) for k, v in s.items() if k.endswith('b1024') and isinstance(v, float)})
" 2>&1 | cut -c1-400
fi
$PY - "$OUT/router_tiles_session17b.json" "$OUT"/decode_routers_session17b*.json <<'PY'
import json, sys
f = lambda x, n=2: "-" if x is None else f"{x:.{n}f}"
try:
    t = json.load(open(sys.argv[1]))["summary"]
    for b in sorted(int(k.rsplit("_b", 1)[1]) for k in t if k.startswith("router_floor_ms")):
        g = lambda key, n=3: f(t.get(f"{key}_b{b}"), n)
        h = lambda tile, key: f(t.get(f"{tile}_b{b}_{key}"), 3)
        print(f"B={b}: routing call torch.topk {g('route_torch_topk_ms')} / row top-k "
              f"{g('route_row_topk_ms')} ms (same triples: {t.get(f'route_selections_equal_b{b}')})"
              f" | top-k alone {g('torch_topk_ms')} / {g('row_topk_ms')} ms | scores "
              f"{h('b32n128w4s4', 'ms')} = {h('b32n128w4s4', 'floor_fraction')} of floor "
              f"{g('router_floor_ms')} ms (3 stages {h('b32n128w4s3', 'ms')})"
              f" | fp32 ref rows {g('first_tile_rows_equal_to_fp32_reference', 4)}, clear "
              f"{g('rows_clear_of_ties', 4)} (equal {g('clear_rows_equal_to_fp32_reference', 4)})")
except Exception as e:  # noqa: BLE001
    print(f"no A/B JSON ({e})")
runs = []
for path in sys.argv[2:]:
    try:
        runs.append((path.rsplit("/", 1)[1], json.load(open(path))))
    except Exception as e:  # noqa: BLE001
        print(f"no decode JSON {path} ({e})")
if runs:
    c = runs[0][1]["ceilings"]
    print("read GB/s", f(c.get("read_bytes_per_s", 0) / 1e9, 0), "| GEMM TFLOP/s",
          f(c.get("gemm_flops_per_s", 0) / 1e12, 0))
for name, d in runs:
    for p in d.get("router_profiles") or []:
        top = ", ".join(f"{k['name'][:20]} {k['device_us']:.0f}us" for k in p["kernels"][:3])
        print(f"{name[15:]} {p['router']} B={p['batch']}: {p['device_us']:.0f} us: {top}"[:200])
    print(f"{name}: {'B':>5} {'router':<18} {'step ms':>8} {'alone ms':>8} {'cost ms':>8} "
          f"{'frac(unrouted)':>14} {'frac(own)':>9}")
    none = {r["batch"]: r["step_ms"] for r in d["rows"] if r["mode"] == "moska:none"}
    for r in d["rows"]:
        cost = r["step_ms"] - none[r["batch"]] if r["batch"] in none else None
        print(f"{'':>{len(name)}}  {r['batch']:>5} {r['mode'][6:]:<18} {f(r['step_ms']):>8} "
              f"{f(r.get('router_alone_ms'), 3):>8} {f(cost):>8} "
              f"{f(r.get('unrouted_floor_fraction'), 3):>14} {f(r.get('roofline_fraction'), 3):>9}")
PY
