#!/usr/bin/env bash
# Session 26, #22.3 / #17.3: the grouped shared attention and the unique attention on the
# same SMs (`moska.bench.step_corun`, one H200). Carry .whl-min (or .whl).
# JSON: $OUT/step_corun_session26.json; the table last. ARGS overrides the sweep.
. bench/device_prologue.sh corun26
LIMIT=${LIMIT:-240}
# shellcheck disable=SC2086
timeout "$LIMIT" python3 -m moska.bench.step_corun ${ARGS:-} --budget-s $(( LIMIT - 60 )) \
  --out "$OUT/step_corun_session26.json" > "$OUT/step_corun.log" 2>&1
echo "step_corun rc=$? ($(( $(date +%s) - T0 )) s)"
grep -E "Error|error" "$OUT/step_corun.log" | tail -3 | cut -c1-300
sed -n '/^B = /,$p' "$OUT/step_corun.log" | cut -c1-400
python3 - "$OUT/step_corun_session26.json" <<'PY'
import json, sys
for row in json.load(open(sys.argv[1]))["rows"]:
    for r, ks in row.get("router_kernels_us", {}).items():
        print(f"B = {row['B']} router {r} kernels (us):", json.dumps(ks))
PY
