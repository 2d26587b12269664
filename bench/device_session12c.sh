#!/usr/bin/env bash
# Session 12, device call 3 (nvidia-h200-x2): GPU 0: #21 FlexiCache speed (store sized for
# the device probes), then #20 SemShareKV prefill speed at 5K-token prompts; GPU 1: #17 a
# second retrieval model (seed 1, 3.5 minutes) and its fidelity table (does the default
# router keep answers on another trained model?). Carry .whl and .models/moska-code-20m.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
jobA() {
  timeout 230 python3 -m moska.bench.flexicache --mode speed --compare-churn -1 \
    --out "$OUT/flexicache_speed_h200.json" > "$OUT/flexicache.log" 2>&1; echo "flexicache rc=$?"
  timeout 250 python3 bench/semshare_speed.py --tokenizer .models/moska-code-20m \
    --out "$OUT/semshare_speed_h200.json" > "$OUT/semshare.log" 2>&1; echo "semshare rc=$?"
}
jobB() {
  timeout 330 python3 -m moska.bench.train_retrieval --out .models/ret-s1 --context 4096 \
    --steps 100000 --max-minutes 3.5 --batch 16 --log-every 500 --save-dtype bfloat16 \
    --workers 6 --seed 1 > "$OUT/train_s1.log" 2>&1; echo "train rc=$?"
  mkdir -p "$OUT/ret-s1"; cp .models/ret-s1/*.json .models/ret-s1/*.safetensors "$OUT/ret-s1/" 2>/dev/null
  timeout 150 python3 -m moska.bench.fidelity --retrieval-model .models/ret-s1 --device cuda \
    --dtype bfloat16 --modes prefix --chunk-sizes 256 --questions 64 \
    --policies default legacy-keymax legacy-two_stage legacy-mean legacy-bound legacy-oracle \
    --out "$OUT/fidelity_retrieval_h200_s1.json" > "$OUT/fid_s1.log" 2>&1; echo "fidelity rc=$?"
}
(CUDA_VISIBLE_DEVICES=0 jobA) & (CUDA_VISIBLE_DEVICES=1 jobB) & wait
tail -4 "$OUT/flexicache.log" | cut -c1-1500; tail -6 "$OUT/semshare.log" | cut -c1-1500
grep '"answer_acc"' "$OUT/train_s1.log" | tail -2; grep -vE "^\s*$" "$OUT/fid_s1.log" | tail -22
