#!/usr/bin/env bash
# Session 18's last device call: every CUDA-marked test (compiled kernels, not the interpreter)
# at the final tree, split over two GPUs of an x2 machine (one GPU: run both halves on it).
# What changed this session that these cover: FlexiCache's default (slots=shared), the
# one-chunk dispatcher's Gluon points, the FP8 paths, the router. tests/server needs `openai`
# (absent on the device) and has no CUDA test; tests/pd has none either.
# Carry .whl (pydantic, fastapi for the engine's imports). Prints each half's tail.
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site_final .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site_final:$PWD
N=$(python3 -c 'import torch; print(torch.cuda.device_count())')
A="tests/kernels tests/library tests/routing tests/semshare"
B="tests/engine tests/distributed tests/test_kernels_large_pool_cuda.py"
# test files that import `openai` at module level (not on the device; none holds a CUDA test)
NO_OPENAI=$(grep -rl --include='test_*.py' '^import openai' tests | sed 's/^/--ignore=/')
half() {  # gpu name paths...
  local gpu=$1 name=$2; shift 2
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=$gpu timeout "${T:-230}" python3 -m pytest -q -m cuda -p no:cacheprovider \
    --durations=5 $NO_OPENAI "$@" > "$OUT/tests_$name.log" 2>&1
  echo "== $name rc=$? in $SECONDS s"; tail -4 "$OUT/tests_$name.log"
}
G1=$([ "$N" -ge 2 ] && echo 1 || echo 0)
# FINAL_HALF=a / b: one half on the one visible GPU (device_session18_final_{a,b}.sh)
case "${FINAL_HALF:-both}" in
  # shellcheck disable=SC2086
  a) half "${CUDA_VISIBLE_DEVICES:-0}" a $A ;;
  # shellcheck disable=SC2086
  b) half "${CUDA_VISIBLE_DEVICES:-0}" b $B; half "${CUDA_VISIBLE_DEVICES:-0}" flexicache tests/flexicache ;;
  # shellcheck disable=SC2086
  *) half 0 a $A & (half "$G1" b $B; half "$G1" flexicache tests/flexicache) & wait ;;
esac
grep -h -E "^(FAILED|ERROR)" "$OUT"/tests_*.log | head -30
