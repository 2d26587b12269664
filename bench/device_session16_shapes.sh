#!/usr/bin/env bash
# #22 item 4, session 16 (one H200, kind nvidia-h200; < 150 s; carry .whl): one 128K-token
# chunk read by B = 16 / 64 / 256 / 1,024 requests at D 64 / 128 x G 1 / 2 / 4 / 8.
# 1) correctness: the CUDA tests of `one_chunk_attention` (Triton, cuDNN and flash through
#    torch with their LSE, the table's dispatch; bf16 vs an fp32 reference, eager and in a
#    CUDA graph), while 12 processes compile the bench's Triton variants into one cache;
# 2) `moska.bench.kernels_one_chunk`: per point every variant is checked against the
#    reference (o and lse, rel err < 1e-2) before it is timed, then Triton variants, the
#    dispatching launcher, cuDNN / flash with their LSE and, as baselines, F.sdpa flash /
#    cuDNN (no LSE; graph-replayed and eager) in two rounds (the second reversed), against
#    floors from a read-only stream and the matmul peak measured in the same run. JSON under
#    $OUT, table printed last (x_base / x_lse: best baseline without / with LSE over the
#    launcher's time; frac: the launcher's floor fraction) and the measured ONE_CHUNK table.
# `bash bench/device_session16_shapes.sh --cpu-dry-run`: the same steps in CPU forms.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_s16_shapes
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$TRITON_CACHE_DIR"
T0=$(date +%s)
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1; DRY="--cpu-dry-run"; NW=2
  TESTS=tests/kernels/test_shared_one_chunk.py; TT=150
else
  PY=python3; export TRITON_INTERPRET=0; DRY=""; NW=12
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_shapes16 .whl/*.whl
  export PYTHONPATH=/tmp/site_shapes16:$PWD
  TESTS=tests/kernels/test_shared_one_chunk_cuda.py; TT=50
  echo "installed in $(( $(date +%s) - T0 )) s"
fi
for i in $(seq 0 $((NW - 1))); do
  timeout 45 $PY -m moska.bench.kernels_one_chunk $DRY --warm "$i/$NW" > "$OUT/warm_$i.log" 2>&1 &
done
timeout $TT $PY -m pytest -q -p no:cacheprovider $TESTS > "$OUT/tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - T0 )) s: $(tail -1 "$OUT/tests.log" | cut -c1-200)"
wait
echo "warm-up (compiles) done at $(( $(date +%s) - T0 )) s; failures:"
grep -h "failed" "$OUT"/warm_*.log | cut -c1-200 | head -6
grep -h "FAILED\|Error" "$OUT/tests.log" | cut -c1-240 | head -8
timeout 95 $PY -m moska.bench.kernels_one_chunk $DRY --out "$OUT" --budget-s 75 \
  --name kernels_one_chunk_h200.json > "$OUT/one_chunk.log" 2>&1
echo "one_chunk rc=$? at $(( $(date +%s) - T0 )) s"
grep -v '^{' "$OUT/one_chunk.log" | tail -42 | cut -c1-200
