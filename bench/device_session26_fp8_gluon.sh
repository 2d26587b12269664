#!/usr/bin/env bash
# Session 26, #16: the Gluon FP8 ping-pong program against the Triton FP8 program and bf16
# (`moska.bench.fp8_gluon`, one H200; Triton 3.6's Gluon). Carry .whl-min (or .whl).
# JSON: $OUT/fp8_gluon_session26.json; the table last.
. bench/device_prologue.sh fp8g26
timeout 90 python3 -m pytest -q -p no:cacheprovider -m cuda tests/kernels/test_gluon_grouped_fp8.py \
  > "$OUT/tests_fp8_gluon.log" 2>&1
echo "cuda test rc=$? ($(( $(date +%s) - T0 )) s): $(tail -1 "$OUT/tests_fp8_gluon.log" | cut -c1-200)"
grep -E "Error|assert" "$OUT/tests_fp8_gluon.log" | head -5 | cut -c1-300
# shellcheck disable=SC2086
timeout "${LIMIT:-240}" python3 -m moska.bench.fp8_gluon ${ARGS:-} \
  --out "$OUT/fp8_gluon_session26.json" > "$OUT/fp8_gluon.log" 2>&1
echo "fp8_gluon rc=$? ($(( $(date +%s) - T0 )) s)"
tail -40 "$OUT/fp8_gluon.log" | cut -c1-1500
