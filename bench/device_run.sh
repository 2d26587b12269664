#!/usr/bin/env bash
# One device call: kernel benchmark, then the end-to-end decode benchmark with both scorers.
# Usage on the GPU machine: bash bench/device_run.sh  (results under $OUT)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
timeout 240 python3 -m moska.bench.kernels --out "$OUT" > "$OUT/kernels.log" 2>&1
echo "kernels rc=$?"; tail -40 "$OUT/kernels.log"
timeout 200 python3 -m moska.bench.decode --scorer mean --cuda-graph --profile --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
echo "decode mean rc=$?"; tail -15 "$OUT/decode.log"
timeout 150 python3 -m moska.bench.decode --scorer two_stage --cuda-graph --out "$OUT/decode_two_stage.json" > "$OUT/decode_two_stage.log" 2>&1
echo "decode two_stage rc=$?"; tail -8 "$OUT/decode_two_stage.log"
ls "$OUT"
