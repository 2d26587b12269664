#!/usr/bin/env bash
# Session 12, last device call (nvidia-h200-x2): GPU 0 #20 SemShareKV TTFT re-time (reuse
# attention without cuDNN) and GPU 1 #21 FlexiCache speed (re-ranking without per-layer
# syncs) in parallel; then over both GPUs TP decode with CUDA graphs under NCCL (bench and
# its cuda-marked test). Carry .whl and .models/moska-code-20m.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
jobA() { timeout 170 python3 bench/semshare_speed.py --tokenizer .models/moska-code-20m \
  --out "$OUT/semshare_speed_h200.json" > "$OUT/semshare.log" 2>&1; echo "semshare rc=$?"; }
jobB() { timeout 170 python3 -m moska.bench.flexicache --mode speed --compare-churn -1 \
  --out "$OUT/flexicache_speed_h200.json" > "$OUT/flexicache.log" 2>&1; echo "flexicache rc=$?"; }
NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -ge 2 ]; then (CUDA_VISIBLE_DEVICES=0 jobA) & (CUDA_VISIBLE_DEVICES=1 jobB) & wait
else jobA; jobB; fi
[ "$NGPU" -ge 2 ] && timeout 130 python3 bench/tp_decode.py --out "$OUT/tp_decode_h200x2.json" > "$OUT/tp_decode.log" 2>&1
echo "tp_decode rc=$?"
[ "$NGPU" -ge 2 ] && TRITON_INTERPRET=0 timeout 80 python3 -m pytest -q -p no:cacheprovider -rs -m cuda \
  tests/distributed/test_tp_graphs.py > "$OUT/tp_tests.log" 2>&1; echo "tp graphs test rc=$?"
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
for f in ("semshare_speed_h200", "flexicache_speed_h200", "tp_decode_h200x2"):
    try:
        print(f, json.dumps(json.load(open(f"{o}/{f}.json"))["summary"])[:1400])
    except Exception as e:  # noqa: BLE001
        print(f, "no summary:", e)
PY
grep -E "^\{'tp'" "$OUT/tp_decode.log" | cut -c1-300; tail -6 "$OUT/tp_tests.log" | cut -c1-300
tail -4 "$OUT/semshare.log" | cut -c1-300; tail -3 "$OUT/flexicache.log" | cut -c1-300
