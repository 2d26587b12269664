#!/usr/bin/env bash
# One device call: kernel benchmark, then the end-to-end decode benchmark with both scorers.
# Usage on the GPU machine: bash bench/device_run.sh  (results under $OUT)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# at most 8 files come back: one log, the JSONs, the plots and the profile
LOG="$OUT/device_run.log"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$LOG"
if [ "${SKIP_KERNELS:-0}" != 1 ]; then
  timeout 300 python3 -m moska.bench.kernels --out "$OUT" >> "$LOG" 2>&1
  echo "kernels rc=$?"; grep -A40 "^NVIDIA" "$LOG" | tail -32
fi
timeout 200 python3 -m moska.bench.decode --scorer mean --cuda-graph --profile --out "$OUT/decode.json" >> "$LOG" 2>&1
echo "decode mean rc=$?"; tail -13 "$LOG"
timeout 150 python3 -m moska.bench.decode --scorer two_stage --cuda-graph --out "$OUT/decode_two_stage.json" >> "$LOG" 2>&1
echo "decode two_stage rc=$?"; tail -6 "$LOG"
ls "$OUT"
timeout 180 python3 -m moska.bench.smoke --out "$OUT/smoke.json" >> "$LOG" 2>&1
echo "smoke rc=$?"; tail -6 "$LOG"
