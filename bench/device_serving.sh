#!/usr/bin/env bash
# One device call for the serving-path work: the CUDA tests (compiled kernels), the
# distributed tests on CUDA tensors, the engine smoke benchmark (decode tok/s with graphs
# and async scheduling, to compare with bench/results/smoke.json), then decode tok/s of a
# stream during an HTTP library build, thread vs process worker.
# Usage on the GPU machine (wheels of the server's packages carried in .whl):
#   bash bench/device_serving.sh        (results under $OUT)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/device_serving.log"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$LOG"
echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)" | tee -a "$LOG"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  TRITON_INTERPRET=0 timeout 240 python3 -m pytest -q -p no:cacheprovider \
    tests/engine/test_overlap_cuda.py tests/engine/test_cuda_graphs_cuda.py \
    tests/library/test_library_cuda.py tests/engine/test_step_kernels_cuda.py \
    tests/test_scheduler_recovery.py >> "$LOG" 2>&1
  echo "cuda tests rc=$? at ${SECONDS}s"; tail -3 "$LOG"
  MOSKA_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout 180 python3 -m pytest -q -p no:cacheprovider \
    tests/distributed >> "$LOG" 2>&1
  echo "distributed tests rc=$? at ${SECONDS}s"; tail -3 "$LOG"
fi
if [ "${SKIP_SMOKE:-0}" != 1 ]; then
  timeout 240 python3 -m moska.bench.smoke --out "$OUT/smoke.json" >> "$LOG" 2>&1
  echo "smoke rc=$? at ${SECONDS}s"; tail -14 "$LOG"
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  timeout 200 python3 bench/build_during_decode.py --device cuda --out "$OUT/build_during_decode_cuda.json" >> "$LOG" 2>&1
  echo "build during decode rc=$? at ${SECONDS}s"; tail -14 "$LOG"
fi
ls "$OUT"
