#!/usr/bin/env bash
# One device call: the CUDA-only tests, the kernel benchmark, then the end-to-end decode
# benchmark with both scorers and the engine smoke test.
# Usage on the GPU machine: bash bench/device_run.sh  (results under $OUT)
# Skip parts with SKIP_TESTS=1, SKIP_KERNELS=1, SKIP_DECODE=1, SKIP_TWO_STAGE=1, SKIP_SMOKE=1.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# at most 8 files come back: one log, the JSONs, the plots and the profile
LOG="$OUT/device_run.log"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$LOG"
# the result JSONs record this commit (a copied tree without .git cannot tell otherwise)
export MOSKA_GIT_COMMIT=${MOSKA_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
echo "commit $MOSKA_GIT_COMMIT" | tee -a "$LOG"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # compiled kernels (not the interpreter) for the tests that need CUDA; the FP8 and
  # slot-table kernel tests by node id (their CUDA cases run, the interpreter's skip)
  TRITON_INTERPRET=0 timeout 200 python3 -m pytest -q -p no:cacheprovider \
    tests/engine/test_overlap_cuda.py tests/engine/test_cuda_graphs_cuda.py \
    tests/library/test_library_cuda.py tests/engine/test_step_kernels_cuda.py \
    tests/test_kernels_large_pool_cuda.py \
    tests/library/test_fp8.py::test_kernel_fp8_path_matches_reference \
    tests/library/test_tiers.py::test_kernel_permuted_slot_table_equals_reference >> "$LOG" 2>&1
  echo "cuda tests rc=$? at ${SECONDS}s"; tail -3 "$LOG"
fi
if [ "${SKIP_KERNELS:-0}" != 1 ]; then
  timeout 420 python3 -m moska.bench.kernels --out "$OUT" >> "$LOG" 2>&1
  echo "kernels rc=$? at ${SECONDS}s"; grep -A40 "^NVIDIA" "$LOG" | tail -32
fi
if [ "${SKIP_DECODE:-0}" != 1 ]; then
  timeout 200 python3 -m moska.bench.decode --scorer mean --cuda-graph --profile --out "$OUT/decode.json" >> "$LOG" 2>&1
  echo "decode mean rc=$? at ${SECONDS}s"; tail -15 "$LOG"
fi
if [ "${SKIP_TWO_STAGE:-0}" != 1 ]; then
  timeout 150 python3 -m moska.bench.decode --scorer two_stage --cuda-graph --out "$OUT/decode_two_stage.json" >> "$LOG" 2>&1
  echo "decode two_stage rc=$? at ${SECONDS}s"; tail -8 "$LOG"
fi
if [ "${SKIP_SMOKE:-0}" != 1 ]; then
  timeout 300 python3 -m moska.bench.smoke --out "$OUT/smoke.json" >> "$LOG" 2>&1
  echo "smoke rc=$? at ${SECONDS}s"; tail -6 "$LOG"
fi
ls "$OUT"
