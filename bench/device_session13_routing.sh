#!/usr/bin/env bash
# Session 13, #17 point 3 / #22 point 5 (one H200, < 240 s): what routing costs in front of
# the grouped step and in the decode step. 1) the router's CUDA tests; 2) the kernels bench's
# routed rows at B = 64 / 256 / 1,024 (8B dims, 1M shared tokens in 4,096-token chunks,
# top-8): the grouped step alone, with the mean and two-stage routers (shortlist 4k and 2k)
# and with the DEFAULT policy (key-max per KV head, no shortlist) on routing indexes of rank
# 32 (head_dim / 4, the default) and 64 (head_dim / 2), each against its floor;
# 3) `moska.bench.decode --scorer keymax --cuda-graph` at the default rank and at
# `--routing-rank 64` (half the head dim; at 8B dims rank 32 IS the default), 4 layers,
# B = 256, modes moska, capped (key-max at one program per SM) and all. Prints one table.
# Carry .whl (no model folder needed).
# `bash bench/device_session13_routing.sh --cpu-dry-run` runs the same steps in their CPU
# forms (Triton interpreter, toy sizes; the decode model's head_dim is 64, so rank 32 is half).
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1
  timeout 120 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_router_dense.py \
    > "$OUT/router_tests.log" 2>&1; echo "router tests (interpreter) rc=$?"
  timeout 200 $PY -m moska.bench.kernels --cpu-dry-run --out "$OUT" > "$OUT/kernels_routers.log" 2>&1
  echo "kernels dry run rc=$?"; KJSON=$OUT/kernels_cpu_dry_run.json
  for R in default 32; do
    EXTRA=""; [ "$R" = default ] || EXTRA="--routing-rank $R"
    timeout 200 $PY -m moska.bench.decode --cpu-dry-run --scorer keymax --cuda-graph $EXTRA \
      --modes moska capped all --build-tokens 0 --out "$OUT/decode_keymax_r$R.json" \
      > "$OUT/decode_r$R.log" 2>&1; echo "decode rank $R rc=$?"
  done
else
  PY=python3
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  TRITON_INTERPRET=0 timeout 30 $PY -m pytest -q -p no:cacheprovider -rs -m cuda \
    tests/kernels/test_router_dense.py > "$OUT/router_tests.log" 2>&1; echo "router cuda tests rc=$?"
  timeout 110 $PY -m moska.bench.kernels --routers-only --router-ranks 32,64 --batch 64,256,1024 \
    --out "$OUT" > "$OUT/kernels_routers.log" 2>&1; echo "kernels routers rc=$?"
  KJSON=$OUT/kernels_routers.json
  for R in default 64; do
    EXTRA=""; [ "$R" = default ] || EXTRA="--routing-rank $R"
    timeout 40 $PY -m moska.bench.decode --scorer keymax --cuda-graph $EXTRA --batch 256 \
      --layers 4 --iters 3 --modes moska capped all --build-tokens 0 \
      --out "$OUT/decode_keymax_r$R.json" > "$OUT/decode_r$R.log" 2>&1; echo "decode rank $R rc=$?"
  done
fi
tail -3 "$OUT/router_tests.log" | cut -c1-300
grep -E "FLOOR CHECK|Error|error" "$OUT/kernels_routers.log" | tail -5 | cut -c1-400
$PY - "$KJSON" "$OUT" <<'PY'
import glob, json, sys
kjson, out = sys.argv[1], sys.argv[2]
f = lambda x: "-" if x is None else f"{x:.3f}"
try:
    rows = json.load(open(kjson))["grouped"]
    print(f"{'B':>5} {'router':<16} {'step ms':>8} {'alone ms':>8} {'floor ms':>8} {'frac':>6}")
    for r in (r for r in rows if r.get("routing") == "uniform"):
        print(f"{r['B']:>5} {'(none)':<16} {f(r['ours_ms']):>8} {'-':>8} {f(r['floor_ms']):>8} {f(r['roofline_fraction']):>6}")
        pre = "roofline_fraction_with_router_"
        for n in [k[len(pre):] for k in r if k.startswith(pre)]:
            print(f"{r['B']:>5} {n:<16} {f(r.get(f'ours_with_router_{n}_ms')):>8} "
                  f"{f(r.get(f'router_{n}_alone_graph_ms')):>8} {f(r.get(f'floor_with_router_{n}_ms')):>8} "
                  f"{f(r.get(pre + n)):>6}")
        for k in (k for k in r if k.startswith("router_") and k.endswith("_err")):
            print(f"{r['B']:>5} {k:<16} {r[k][-200:]}")
    t = json.load(open(kjson)).get("keymax_dense_tiles", {})
    print("key-max scores alone (default router), B =", t.get("B"), "rank", t.get("rank"), ":",
          {k[:-3]: round(v, 3) for k, v in t.items() if k.endswith("_ms")}, "TFLOP/s",
          {k[:-7]: round(v) for k, v in t.items() if k.endswith("_tflops")})
except Exception as e:  # noqa: BLE001
    print("kernels: no table:", e)
print(f"\ndecode (--scorer keymax): {'rank':>5} {'B':>5} {'mode':>6} {'step ms':>8} {'tok/s':>9} {'frac':>6} router GFLOP")
for p in sorted(glob.glob(f"{out}/decode_keymax_r*.json")):
    try:
        d = json.load(open(p))
        for r in d["rows"]:
            gf = r.get("router_flops")
            gf = "-" if gf is None else f"{gf / 1e9:.4g}"
            print(f"{'':26}{d['summary'].get('routing_rank', '?'):>5} {r['batch']:>5} {r['mode']:>6} "
                  f"{f(r['step_ms']):>8} {r['decode_tokens_per_s']:>9.1f} {f(r['roofline_fraction']):>6} "
                  f"{gf}")
    except Exception as e:  # noqa: BLE001
        print(p, "no rows:", e)
PY
