#!/usr/bin/env bash
# Session 13 (#23 "how it is checked"): every CUDA-marked test on one H200 with compiled
# kernels, then the kernels benchmark, to compare with the last run (kernels_h200_floors.json).
# Carry .whl, .models/moska-code-20m and .models/retrieval-4k.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
TRITON_INTERPRET=0 timeout 300 python3 -m pytest -q -p no:cacheprovider -rs -m cuda --continue-on-collection-errors tests \
  > "$OUT/tests_cuda_h200_session13.log" 2>&1; echo "cuda tests rc=$?"
tail -3 "$OUT/tests_cuda_h200_session13.log" | cut -c1-300
timeout 200 python3 -m moska.bench.kernels --out "$OUT" > "$OUT/kernels.log" 2>&1; echo "kernels rc=$?"
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
try:
    print(json.dumps(json.load(open(f"{o}/kernels.json"))["summary"])[:2500])
except Exception as e:  # noqa: BLE001
    print("kernels no summary:", e)
PY
