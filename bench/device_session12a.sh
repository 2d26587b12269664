#!/usr/bin/env bash
# Session 12, device call 1: #17's GPU bisection (why the H200 lost answers CPU keeps),
# #16 FP8 tensor cores at B = 1,024; the two GPUs of nvidia-h200-x2 in parallel (one GPU:
# the same jobs in turn). Carry .whl and .models/retrieval-4k.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
NGPU=$(nvidia-smi -L | wc -l); echo "gpus: $NGPU"
fid() {  # dtype attention
  timeout "${FID_S:-200}" python3 -m moska.bench.fidelity --retrieval-model .models/retrieval-4k \
    --device cuda --dtype "$1" --attention "$2" --modes prefix --chunk-sizes 256 --questions 128 \
    --policies default legacy-keymax legacy-two_stage legacy-mean legacy-bound legacy-oracle \
    --out "$OUT/fidelity_retrieval_h200_$1_$2.json" > "$OUT/fid_$1_$2.log" 2>&1
  echo "fidelity $1 $2 rc=$?"
}
jobA() { fid bfloat16 triton; fid float32 triton; }
jobB() {
  fid bfloat16 torch
  timeout 120 python3 -m moska.bench.fp8_attention --routing uniform --batch 1024 \
    --variants fp8_mma_vt fp8_mma_qsplit_vt --out "$OUT/fp8_attention_h200_mma_vt_1024.json" \
    > "$OUT/fp8_1024.log" 2>&1; echo "fp8 rc=$?"
}
if [ "$NGPU" -ge 2 ]; then
  (CUDA_VISIBLE_DEVICES=0 jobA) & (CUDA_VISIBLE_DEVICES=1 jobB) & wait
else
  jobA; jobB
fi
for f in "$OUT"/fid_*.log; do echo "== $f"; grep -vE "^\s*$" "$f" | tail -12; done
echo "== fp8"; tail -15 "$OUT/fp8_1024.log"
