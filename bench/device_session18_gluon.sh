#!/usr/bin/env bash
# #22 items 3-4, session 18 (one H200, kind nvidia-h200; < 150 s; carry .whl-min, optional).
# Gluon (Triton 3.6's lower-level dialect) attention kernels for Hopper against the Triton
# kernels, cuDNN and flash, every call checked against an fp32 / PyTorch reference (bf16 rel
# err < 1e-2) before it is timed, graph-replayed in rotated rounds, floors from the read
# stream and the matmul rate measured in each run:
# 1) `python3 -m moska.bench.kernels_gluon --dims 128 --gqa 8,4,2 --b-list 1024,256
#    --rounds 5` (calls 2-3: all D and G, B 256 / 1,024, 3 rounds): one 128K-token chunk read
#    by B requests (moska/kernels/gluon_one_chunk.py:
#    "ws" = FA3 ping-pong, two 64-row consumer warpgroups taking turns on the tensor cores
#    + a TMA loader warp; "wso" = ws + the intra-warpgroup overlap: softmax(i) beside its own
#    P V(i - 1)); call 1 (bench/results/kernels_gluon_h200_session18.json) timed B 16-1,024;
# 2) `python3 -m moska.bench.kernels_gluon_grouped --gqa 4,8 --b-list 1024 --rounds 3`
#    (calls 2-3: G 1-8, B 256 / 1,024): the grouped step
#    (1M shared tokens, 4,096-token chunks, top-8, uniform) through the Triton kernel and the
#    Gluon ping-pong kernel (moska/kernels/gluon_grouped.py), read-floor fractions.
# 12 processes compile both benches' kernels first (6 each), beside the CUDA tests of the
# one-chunk dispatcher's "gluon" backend (tests/kernels/test_shared_one_chunk_cuda.py -k gluon).
# `bash bench/device_session18_gluon.sh --cpu-dry-run`: bench 1's reference + Triton path in
# the interpreter (Gluon cannot run there; bench 2 needs a GPU).
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_s18_gluon
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$TRITON_CACHE_DIR"
T0=$(date +%s)
# call 6: the dispatcher's Gluon point (D 128 G 8 B 1,024) and G 4 beside it in 5 rounds; the
# grouped step at G 4 / 8 with 2 and 3 consumer warpgroups
OC="--dims 128 --gqa 8,4 --b-list ${GLUON_B:-1024} --rounds 5"
GR="--gqa 4,8 --b-list ${GROUPED_B:-1024,256} --rounds 3"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1
  timeout 300 $PY -m moska.bench.kernels_gluon --cpu-dry-run --out "$OUT" 2>&1 | tee "$OUT/gluon.log"
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
NW=6
for i in $(seq 0 $((NW - 1))); do
  timeout 55 $PY -m moska.bench.kernels_gluon --warm "$i/$NW" $OC > "$OUT/warm_oc_$i.log" 2>&1 &
  timeout 55 $PY -m moska.bench.kernels_gluon_grouped --warm "$i/$NW" $GR > "$OUT/warm_gr_$i.log" 2>&1 &
done
# the dispatcher's "gluon" backend vs the fp32 reference, eager and replayed from a CUDA graph
# and the table's dispatch (D 128 G 8 from 8,192 rows: Gluon) through the engine's seam
timeout 55 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_shared_one_chunk_cuda.py \
  tests/engine/test_one_chunk_seam_cuda.py -k "gluon or None or 1024" > "$OUT/tests.log" 2>&1 &
wait
echo "CUDA tests (backend gluon, the dispatch, the engine seam): $(tail -1 "$OUT/tests.log" | cut -c1-200)"
grep -h "FAILED\|Error" "$OUT/tests.log" | cut -c1-240 | head -4
echo "warm-up (compiles) done at $(( $(date +%s) - T0 )) s; failures:"
grep -h "failed" "$OUT"/warm_*.log | cut -c1-300 | head -6
timeout 45 $PY -m moska.bench.kernels_gluon --out "$OUT" --budget-s 28 $OC \
  --name kernels_gluon_h200_session18e.json > "$OUT/gluon.log" 2>&1
echo "one-chunk rc=$? at $(( $(date +%s) - T0 )) s"
timeout 45 $PY -m moska.bench.kernels_gluon_grouped --out "$OUT" --budget-s 28 $GR \
  --name kernels_gluon_grouped_h200_session18d.json > "$OUT/grouped.log" 2>&1
echo "grouped rc=$? at $(( $(date +%s) - T0 )) s"
for f in gluon grouped; do
  grep -h "^read\|^split check\|^wrong\|^FLOOR\|^Traceback\|^[A-Za-z]*Error" "$OUT/$f.log" | cut -c1-400
  sed -n '/^point/,$p' "$OUT/$f.log"
  tail -2 "$OUT/$f.log" | cut -c1-300
done
