#!/usr/bin/env bash
# Session 16, #17.3 / #22.5 (one H200, < 150 s): what the DEFAULT router (key-max over every
# low-rank key, per KV head) costs in the decode step, and where its time goes.
# 1) CUDA tests: the key-max tile chosen now picks the chunks of the tile before (8B dims;
#    the log says whether the scores are bitwise equal), the per-KV-head shortlist against
#    its reference, the dense key-max kernel against the plain-PyTorch scores at 8B dims;
# 2) `moska.bench.decode --routers ...`: the decode step at B = 64 / 256 / 1,024, 8B dims
#    (4 layers: 1M tokens of 32 layers do not fit), 1M shared tokens in 4,096-token chunks,
#    top-8, CUDA graphs, once per router in ONE run on one library: no router (fixed uniform
#    chunks), the old two-stage (per request), the default with the tile before session 16,
#    the default now, and key-max on a per-KV-head bound shortlist (a study knob); each
#    router alone (one layer, graph); the default with its key-max launch capped at one
#    program per SM ("capped": room beside it for the unique attention on the other
#    stream; same chunks); floors from a read-only stream (bandwidth.py); a
#    profile of one eager routing call at B = 1,024 (kernels, launches, host time, syncs).
# 3) the key-max scores alone per tile, 7 rounds (router_tiles_session16b.json); 4) in the
# time left, the kernels bench's routed rows at B = 1,024 (kernels_routers.json).
# Carry .whl (no model folder). JSON: $OUT/decode_routers_session16b.json; table last.
# `bash bench/device_session16_router.sh --cpu-dry-run`: the same steps in CPU forms.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
ROUTERS="none two_stage_old default_before default default_shortlist_kv"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1
  TESTS="tests/routing/test_router_cost.py"; TT=200; LEFT=1200  # the interpreter is slow
  DARGS="--cpu-dry-run"; SARGS="--cpu-dry-run"; DRY=1
else
  PY=python3; export TRITON_INTERPRET=0
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_router16 .whl/*.whl
  export PYTHONPATH=/tmp/site_router16:$PWD
  TESTS="-m cuda tests/routing/test_router_cost.py"; TT=30  # its test covers the dense kernel
  DARGS="--batch 64 256 1024 --library-tokens 1048576 --layers 4 --iters 5 --cuda-graph"
  SARGS="--batch 1024"; LEFT=145
fi
# shellcheck disable=SC2086
timeout $TT $PY -m pytest -q -s -p no:cacheprovider -rs $TESTS > "$OUT/router_tests.log" 2>&1
echo "router tests rc=$? ($(( $(date +%s) - T0 )) s)"
grep -E "bitwise|passed|failed|Error" "$OUT/router_tests.log" | tail -4 | cut -c1-300
TD=$(( LEFT - ($(date +%s) - T0) - 15 ))
# shellcheck disable=SC2086
timeout $TD $PY -m moska.bench.decode $DARGS --routers $ROUTERS --modes moska capped \
  --chunk-size 4096 --top-k 8 --build-tokens 0 --out "$OUT/decode_routers_session16b.json" \
  > "$OUT/decode_routers.log" 2>&1
echo "decode routers rc=$? ($(( $(date +%s) - T0 )) s)"
grep -E "Error|error|FLOOR" "$OUT/decode_routers.log" | tail -4 | cut -c1-300
# 3) the default router's scores alone per key-max tile (one layer, 1M keys, B = 1,024),
# 7 rounds with the order rotated (call 1's single pass disagreed with the decode rows
# about which tile is faster), the median per tile
TS=$(( LEFT - ($(date +%s) - T0) ))
[ -z "${DRY:-}" ] && [ $TS -gt 40 ] && TS=40  # leave the rest to 4)
if [ $TS -ge 15 ]; then
  # shellcheck disable=SC2086
  timeout $TS $PY -m moska.bench.decode_routers $SARGS --rounds 7 --tiles b32n64w4s5 \
    b32n128w4s4 b64n64w4s4 --out "$OUT/router_tiles_session16b.json" \
    > "$OUT/router_tiles.log" 2>&1
  echo "tile sweep rc=$? ($(( $(date +%s) - T0 )) s)"; grep "^tile" "$OUT/router_tiles.log" | cut -c1-160
fi
# 4) the issue's own measure in the time left: the grouped step alone and with each router
# in front, against its floor (kernels bench, B = 1,024, rank 32 = the default)
TK=$(( LEFT - ($(date +%s) - T0) ))
if [ -z "${DRY:-}" ] && [ $TK -ge 40 ]; then
  timeout $TK $PY -m moska.bench.kernels --routers-only --router-ranks 32 --batch 1024 \
    --out "$OUT" > "$OUT/kernels_routers.log" 2>&1
  echo "kernels routers rc=$? ($(( $(date +%s) - T0 )) s)"
  $PY -c "
import json; s = json.load(open('$OUT/kernels_routers.json'))['summary']
print({k: round(v, 3) for k, v in s.items() if k.endswith('b1024') and isinstance(v, float)})
" 2>&1 | cut -c1-600
fi
$PY - "$OUT/decode_routers_session16b.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    sys.exit(f"no decode JSON ({e})")
f = lambda x, n=2: "-" if x is None else f"{x:.{n}f}"
print("read GB/s", f(d["ceilings"].get("read_bytes_per_s", 0) / 1e9, 0), "| layers",
      d["shapes"]["layers"], "| rank", d["summary"].get("routing_rank"))
for p in d.get("router_profiles") or []:
    top = ", ".join(f"{k['name'][:28]} x{k['launches']} {k['device_us']:.0f}us"
                    for k in p["kernels"][:4])
    print(f"profile {p['router']} B={p['batch']}: {p['launches']} launches, device "
          f"{p['device_us']:.0f} us, host {p['host_us_per_call']:.0f} us/call, "
          f"sync {p['host_sync']}: {top}"[:300])
print(f"{'B':>5} {'router':<21} {'step ms':>8} {'alone ms':>8} {'cost ms':>8} "
      f"{'frac(unrouted floor)':>20} {'frac(own floor)':>15}")
none = {r["batch"]: r["step_ms"] for r in d["rows"] if r["mode"] == "moska:none"}
for r in d["rows"]:
    cost = r["step_ms"] - none[r["batch"]] if r["batch"] in none else None
    name = r["mode"][6:] if r["mode"].startswith("moska:") else r["mode"] + " (default)"
    print(f"{r['batch']:>5} {name:<21} {f(r['step_ms']):>8} "
          f"{f(r.get('router_alone_ms'), 3):>8} {f(cost):>8} "
          f"{f(r.get('unrouted_floor_fraction'), 3):>20} {f(r.get('roofline_fraction'), 3):>15}")
PY
