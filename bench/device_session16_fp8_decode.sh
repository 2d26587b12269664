#!/usr/bin/env bash
# #16 end-to-end routed decode with an FP8 library vs bf16, session 16 (one H200, kind
# nvidia-h200; < 150 s): a random-weight Llama of 8B dims, a 512K-token library of 4,096-token
# chunks (random KV, made on the device one layer at a time; each mode's library freed before
# the next), top-8, B = 256 requests of 512 own tokens, one decode step (forward + logits +
# argmax) as a CUDA graph: bf16, FP8 upcast, FP8 tensor cores (`--fp8-attention mma`: token-
# major V copy) and mma_qsplit, each also profiled once eagerly (GPU ms by kernel family:
# grouped attention, router, paged, GEMMs, rest). The target: >= 1.3x bf16 tok/s at B = 256.
# First call (1eb09be): bf16 47.56 ms, mma 43.06 (1.10x), qsplit 45.75, upcast 69.78. Carry .whl.
# `bash bench/device_session16_fp8_decode.sh --cpu-dry-run`: the same on CPU, tiny.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
J="$OUT/fp8_decode_h200_session16.json"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1; ARGS="--cpu-dry-run"; LIM=300
else
  PY=python3; export TRITON_INTERPRET=0; LIM=140
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_fp8d .whl/*.whl
  export PYTHONPATH=/tmp/site_fp8d:$PWD
  ARGS="--batch 256 --modes bf16 fp8_mma fp8_upcast fp8_mma_qsplit --profile"
fi
TS=$(( LIM - ($(date +%s) - T0) ))
# shellcheck disable=SC2086
timeout $TS $PY -m moska.bench.fp8_decode $ARGS --out "$J" > "$OUT/decode.log" 2>&1
echo "decode rc=$? ($(( $(date +%s) - T0 )) s)"
grep -i "error\|Traceback" "$OUT/decode.log" | head -4 | cut -c1-300
tail -6 "$OUT/decode.log" | cut -c1-300
$PY -c "import json,sys; [print(r['mode'], r['step_ms'], r.get('kernel_ms')) for r in json.load(open(sys.argv[1]))['rows']]" "$J" 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
