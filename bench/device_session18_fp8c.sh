#!/usr/bin/env bash
# #16 FP8, session 18 third call (one H200, kind nvidia-h200; ~60 s): the CUDA cases of the
# FP8 kernel and engine-path tests, with the new ones: a library with Hadamard-rotated K and
# K and V scales per 128-row block read through the engine's attention path (q rotated at
# launch, one-term q; fp8_decode's `fp8_mma_rot_blk`, 1.153x end to end in call 4), against
# the program's algorithm and the dequantized library; f16 exp2 (EX2_F16) has CPU tests only.
# Then (45 s) B = 1,024 with 8 warps on the 64-row tile (two warpgroups share each 64 x 128
# tile: half the registers per thread; call 1-4 tiles: 4 warps at 252-255 registers, one
# program per SM) for the quality-kept programs (q split + V block; rotated both-block).
# Carry .whl-min. CPU form: bash bench/device_session18_fp8c.sh --cpu-dry-run
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
TESTS="tests/kernels/test_shared_attention_fp8.py tests/library/test_fp8_mma.py"
TESTS="$TESTS tests/library/test_tiers_fp8_mma.py"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1; SEL=""; TT=300
  RARGS="--cpu-dry-run"; TR=300
else
  PY=python3; export TRITON_INTERPRET=0; SEL="-m cuda"; TT=80
  RARGS="--batch 1024 --tiles 64,128,4,3 64,128,8,3 64,128,8,2 --bf16-tiles"; TR=62
  W=.whl-min; [ -d "$W" ] || W=.whl
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_fp8_18 "$W"/*.whl
  export PYTHONPATH=/tmp/site_fp8_18:$PWD
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null | head -1
# shellcheck disable=SC2086
timeout $TT $PY -m pytest -q -p no:cacheprovider -rs $SEL $TESTS > "$OUT/tests_fp8_cuda.log" 2>&1
echo "tests rc=$? ($(( $(date +%s) - T0 )) s): $(tail -1 "$OUT/tests_fp8_cuda.log" | cut -c1-200)"
grep -E "FAILED|Error" "$OUT/tests_fp8_cuda.log" | head -5 | cut -c1-300
# shellcheck disable=SC2086
timeout $TR $PY -m moska.bench.fp8_reach $RARGS --variants fp8_mma_qsplit_vt_vb fp8_mma_vt_block \
  --wide-tiles-for fp8_mma_qsplit_vt_vb fp8_mma_vt_block \
  --out "$OUT/fp8_reach_h200_session18c.json" > "$OUT/reach.log" 2>&1
echo "reach rc=$? ($(( $(date +%s) - T0 )) s)"
grep "B=1024 uniform: [a-z0-9_]* [0-9.]* ms\|Error" "$OUT/reach.log" | cut -c1-200
echo "total $(( $(date +%s) - T0 )) s"
