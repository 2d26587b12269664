#!/usr/bin/env bash
# Session 27, #16: end-to-end FP8 decode against bf16 at B = 256 (`moska.bench.fp8_decode`,
# one H200) under the default key-max router and the two-stage router. Carry .whl-min (or .whl).
# JSON: $OUT/fp8_decode_session27.json; the summary last.
. bench/device_prologue.sh fp8d27
# shellcheck disable=SC2086
timeout "${LIMIT:-400}" python3 -m moska.bench.fp8_decode --batch 256 \
  --modes bf16 fp8_mma_rot_blk --scorers keymax two_stage --profile ${ARGS:-} \
  --out "$OUT/fp8_decode_session27.json" > "$OUT/fp8_decode.log" 2>&1
echo "fp8_decode rc=$? ($(( $(date +%s) - T0 )) s)"
tail -12 "$OUT/fp8_decode.log" | cut -c1-1500
