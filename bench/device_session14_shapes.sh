#!/usr/bin/env bash
# #22 items 3-4 (one H200, < 200 s): the grouped shared kernel's tile and kernel variants
# (128-row tiles with half-height tails, stages, BLOCK_N, warp specialization) per model
# shape (D 64/128 x G 1/4/8), grouped B = 64 / 1,024 (uniform + Zipf) and one 128K chunk
# read by B = 16-1,024 requests against flash / cuDNN, floors from a read-only stream
# measured in the same run. Each variant is checked in bf16 against the reference before it
# is timed. 14 processes first compile every variant into one Triton cache (toy key
# counts, same launch arguments), so the timed run spends its time timing. Carry .whl.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_s14
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$TRITON_CACHE_DIR"
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
echo "installed in $(( $(date +%s) - T0 )) s"
N=14
for i in $(seq 0 $((N - 1))); do
  timeout 70 python3 -m moska.bench.kernels_shapes_variants --warm "$i/$N" > "$OUT/warm_$i.log" 2>&1 &
done
wait
echo "warm-up (compiles) done at $(( $(date +%s) - T0 )) s; failures:"
grep -h "failed" "$OUT"/warm_*.log | cut -c1-200 | head -8
timeout 100 python3 -m moska.bench.kernels_shapes_variants --out "$OUT" --budget-s 80 \
  --name kernels_shapes_variants_h200.json > "$OUT/variants.log" 2>&1
echo "variants rc=$? at $(( $(date +%s) - T0 )) s"
sed -n '/^point /,$p' "$OUT/variants.log" | cut -c1-200
tail -3 "$OUT/variants.log" | cut -c1-300
