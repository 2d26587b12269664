#!/usr/bin/env bash
# Session 12, device call 2 (nvidia-h200-x2): #21 FlexiCache speed on GPU 0 and #22 the
# kernel floors on GPU 1 in parallel; then, over both GPUs, the distributed tests on NCCL
# (a GPU per rank) and Helix HOP-B at 2 ranks. Carry .whl and .models/moska-code-20m.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
jobA() { timeout 230 python3 -m moska.bench.flexicache --mode speed --compare-churn -1 \
  --out "$OUT/flexicache_speed_h200.json" > "$OUT/flexicache.log" 2>&1; echo "flexicache rc=$?"; }
jobB() { L=$OUT/kernels_floors.log
  timeout 150 python3 -m moska.bench.kernels --out "$OUT" >> "$L" 2>&1; echo "kernels rc=$?"
  timeout 100 python3 -m moska.bench.kernels_shapes --tiles table --head-dims 64,128 --budget-s 70 \
    --name kernels_shapes_floors.json --out "$OUT" >> "$L" 2>&1; echo "shapes rc=$?"; }
(CUDA_VISIBLE_DEVICES=0 jobA) & (CUDA_VISIBLE_DEVICES=1 jobB) & wait
MOSKA_TEST_DEVICE=cuda MOSKA_TEST_BACKEND=nccl TRITON_INTERPRET=0 timeout 150 python3 -m pytest -q -x \
  -p no:cacheprovider tests/distributed > "$OUT/nccl_tests.log" 2>&1; echo "nccl tests rc=$?"
timeout 60 python3 bench/helix_hopb.py --device cuda --backend nccl --dtype bfloat16 --ranks 2 \
  --batch 256 --context 4096 --iters 20 --out "$OUT/helix_hopb_h200x2_nccl.json" > "$OUT/hopb.log" 2>&1; echo "hopb rc=$?"
tail -25 "$OUT/flexicache.log"; grep -E "FLOOR CHECK|^summary|Error" "$OUT/kernels_floors.log" | tail -20
tail -15 "$OUT/nccl_tests.log"; tail -12 "$OUT/hopb.log"
