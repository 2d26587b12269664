#!/usr/bin/env bash
# Session 18 (one H200, ~50 s; optional): #21 FlexiCache's CUDA tests again at a HEAD with
# 782f62a / 9d069ff, where the shared-vs-per-layer equality tests name `slots=layer` (at call
# 1's 1f5077a `--flexicache on` had become slots=shared, so those two CUDA tests compared
# shared slots with shared slots). Only the tests; no benchmark.
# Carry .whl-min. `bash bench/device_session18_flexicache_tests.sh --cpu-dry-run`: CPU form.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
TESTS="tests/flexicache/test_later_hand_offs.py tests/flexicache/test_shared_slots.py
tests/flexicache/test_engine_rerank_reads.py"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1; TT=600
else
  PY=python3; export TRITON_INTERPRET=0; TT=100
  W=.whl-min; [ -d "$W" ] || W=.whl
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_fc18t "$W"/*.whl
  export PYTHONPATH=/tmp/site_fc18t:$PWD
fi
# shellcheck disable=SC2086
timeout $TT $PY -m pytest -q -p no:cacheprovider -rs --durations=4 $TESTS \
  > "$OUT/flexicache_tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - T0 )) s"
tail -8 "$OUT/flexicache_tests.log" | cut -c1-300
