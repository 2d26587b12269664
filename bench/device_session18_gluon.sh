#!/usr/bin/env bash
# #22 item 4, session 18 (one H200, kind nvidia-h200; < 150 s; carry .whl-min).
# The Gluon one-chunk kernel (moska/kernels/gluon_one_chunk.py: TMA ring + mbarriers + async
# wgmma, QK^T of the next block in flight during the softmax) against the Triton table tile,
# cuDNN and flash (with LSE) on one 128K-token chunk read by B = 16-1,024 requests, D 64/128
# x G 1/2/4/8, bf16: `python3 -m moska.bench.kernels_gluon`. Every call checked against an
# fp32 reference (bf16 rel err < 1e-2) before it is timed, plus a split/partial-block check
# per head dim; times graph-replayed in 2 rotated rounds; floors from the read stream and
# matmul measured in the run. 10 processes compile (warm the Triton cache) first.
# Two schedules: "pipe" (one partition) and "ws" (FA3 ping-pong: two consumer warpgroups
# taking turns to issue their wgmmas, a loader warp; gl.warp_specialize).
# `bash bench/device_session18_gluon.sh --cpu-dry-run`: the reference + Triton path in the
# interpreter (Gluon cannot run there) and an sm_90 compile of the Gluon kernel if possible.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_s18_gluon
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$TRITON_CACHE_DIR"
T0=$(date +%s)
ARGS=${GLUON_ARGS:-}
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1
  timeout 300 $PY -m moska.bench.kernels_gluon --cpu-dry-run --out "$OUT" $ARGS 2>&1 | tee "$OUT/gluon.log"
  exit "${PIPESTATUS[0]}"
fi
PY=python3; export TRITON_INTERPRET=0
if ls .whl-min/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_gluon18 .whl-min/*.whl
  export PYTHONPATH=/tmp/site_gluon18:$PWD
else
  export PYTHONPATH=$PWD
fi
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
NW=10
for i in $(seq 0 $((NW - 1))); do
  timeout 75 $PY -m moska.bench.kernels_gluon --warm "$i/$NW" $ARGS > "$OUT/warm_$i.log" 2>&1 &
done
wait
echo "warm-up (compiles) done at $(( $(date +%s) - T0 )) s; failures:"
grep -h "failed" "$OUT"/warm_*.log | cut -c1-300 | head -6
timeout 100 $PY -m moska.bench.kernels_gluon --out "$OUT" --budget-s 60 $ARGS \
  --name kernels_gluon_h200_session18.json > "$OUT/gluon.log" 2>&1
echo "gluon rc=$? at $(( $(date +%s) - T0 )) s"
grep -h "^read\|^split check\|^wrong\|^FLOOR\|^Traceback\|^[A-Za-z]*Error" "$OUT/gluon.log" | cut -c1-400
sed -n '/^point/,$p' "$OUT/gluon.log"
tail -3 "$OUT/gluon.log" | cut -c1-300
