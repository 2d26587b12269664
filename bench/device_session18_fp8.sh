#!/usr/bin/env bash
# #16 FP8 targets, session 18 (one H200, kind nvidia-h200; < 150 s): what is reachable.
# 1) grouped shared attention at 8B dims, 1M-token library, top-8, B = 1,024 / 256 / 64
#    (`python -m moska.bench.fp8_reach`): ceilings measured in the run (read-only stream,
#    bf16 GEMM, e4m3 `_scaled_mm`, an online-softmax probe with fp32 and f16 exp2), the
#    read / tensor / softmax floors of bf16 and FP8 (one-term q, q split), bf16 at its best of
#    3 tiles; FP8 q split + V block scales (quality kept) on 3 tiles (128-row tiles: each K/V
#    tile serves twice the rows), and at the engine's tile: the same with f16 exp2
#    (`_ex16`: EX2_F16, two exp2 per instruction), one-term q + V block (`vt_vb`, what a
#    Hadamard-rotated K would run: bench/fp8_quality.py rot_* variants) +- ex16, both scales
#    per block +- ex16, per-chunk scales; every variant and tile checked vs the fp32
#    reference first (rc 1 if one is off); the compiled programs' registers, spills, PTX.
# 2) the Amdahl bound of the B = 256 decode step with the grouped kernel at its FP8 read
#    floor (`python -m moska.bench.fp8_reach_e2e`) from session 17's decode profile
#    (bench/results/fp8_decode_h200_session17c.json) and this run's read bandwidth; with
#    FP8_DECODE=1 and 45 s left, a fresh decode run (bf16, fp8_mma_qsplit_vb_half) instead.
# Carry .whl-min (the engine's imports). CPU form: bash bench/device_session18_fp8.sh --cpu-dry-run
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
J="$OUT/fp8_reach_h200_session18.json"; JR=$J; JD="$OUT/fp8_decode_h200_session18.json"
TILES="64,128,4,3 128,128,8,3 128,64,8,3"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1; LIM=900
  RARGS="--cpu-dry-run"; TR=400; JR="${J%.json}_cpu_dry_run.json"
  DARGS="--cpu-dry-run"; JD="${JD%.json}_cpu_dry_run.json"
else
  PY=python3; export TRITON_INTERPRET=0; LIM=145
  W=.whl-min; [ -d "$W" ] || W=.whl
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_fp8_18 "$W"/*.whl
  export PYTHONPATH=/tmp/site_fp8_18:$PWD
  RARGS="--batch 1024 256 64 --tiles $TILES"; TR=128
  DARGS="--batch 256 --modes bf16 fp8_mma_qsplit_vb_half --profile"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null | head -1
# shellcheck disable=SC2086
timeout $TR $PY -m moska.bench.fp8_reach $RARGS --out "$J" > "$OUT/reach.log" 2>&1
echo "reach rc=$? ($(( $(date +%s) - T0 )) s)"
grep -i "error\|Traceback\|ceilings" "$OUT/reach.log" | head -4 | cut -c1-400
TD=$(( LIM - ($(date +%s) - T0) - 3 ))
if [ "$TD" -gt 45 ] && [ "${FP8_DECODE:-0}" = 1 ]; then
  # shellcheck disable=SC2086
  timeout $TD $PY -m moska.bench.fp8_decode $DARGS --out "$JD" > "$OUT/decode.log" 2>&1
  echo "decode rc=$? ($(( $(date +%s) - T0 )) s)"
  grep -i "error\|Traceback" "$OUT/decode.log" | head -3 | cut -c1-300
else
  echo "decode skipped: ${TD} s left"
fi
# no decode run: session 17's (same kernels and modes) with this run's read bandwidth
[ -f "$JD" ] || JD=bench/results/fp8_decode_h200_session17c.json
[ -f "$JR" ] && $PY -m moska.bench.fp8_reach_e2e "$JR" "$JD"
echo "total $(( $(date +%s) - T0 )) s"
