#!/usr/bin/env bash
# Session 27, #16: the Triton FP8 program with capped registers and half-tail 128-row tiles
# (`moska.bench.fp8_occupancy`, one H200). Carry .whl-min (or .whl).
# JSON: $OUT/fp8_occupancy_session27.json; the table last.
. bench/device_prologue.sh fp8o27
timeout 90 python3 -m pytest -q -p no:cacheprovider -m cuda tests/kernels/test_shared_attention_fp8.py \
  > "$OUT/tests_fp8.log" 2>&1
echo "cuda test rc=$? ($(( $(date +%s) - T0 )) s): $(tail -1 "$OUT/tests_fp8.log" | cut -c1-200)"
grep -E "Error|assert" "$OUT/tests_fp8.log" | head -5 | cut -c1-300
# shellcheck disable=SC2086
timeout "${LIMIT:-240}" python3 -m moska.bench.fp8_occupancy ${ARGS:-} \
  --out "$OUT/fp8_occupancy_session27.json" > "$OUT/fp8_occupancy.log" 2>&1
echo "fp8_occupancy rc=$? ($(( $(date +%s) - T0 )) s)"
tail -40 "$OUT/fp8_occupancy.log" | cut -c1-1500
