#!/usr/bin/env bash
# #18.2 / #24.1 on nvidia-h200-x2 (2 GPUs, NCCL): tensor-parallel decode with CUDA graphs.
#   bash bench/device_tp_graphs.sh bench   TP = 1 (graphs), TP = 2 (graphs on both ranks) and
#                                          TP = 2 eager in one run -> $OUT/tp_decode_h200x2.json
#   bash bench/device_tp_graphs.sh tests   the TP tests on the GPUs: test_tp_graphs.py (its
#                                          cuda-marked NCCL test: graphs replayed on both ranks,
#                                          greedy tokens equal one GPU) and test_tp_library.py
#   bash bench/device_tp_graphs.sh all     both (may pass 600 s: prefer two calls)
# Carry .whl when the device lacks the Python dependencies (installed as the session scripts do).
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export MOSKA_TP_CUDA_GRAPHS=1  # TP CUDA graphs are opt-in until this run measures them
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
what=${1:-all}
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 500 python3 bench/tp_decode.py --out "$OUT/tp_decode_h200x2.json" \
    > "$OUT/tp_decode.log" 2>&1; echo "tp_decode rc=$?"
  grep -E "^\{'tp'|^summary" "$OUT/tp_decode.log" | cut -c1-700; tail -3 "$OUT/tp_decode.log"
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 500 python3 -m pytest -q -p no:cacheprovider -rs tests/distributed/test_tp_graphs.py \
    tests/distributed/test_tp_library.py > "$OUT/tp_tests.log" 2>&1; echo "tests rc=$?"
  tail -25 "$OUT/tp_tests.log" | cut -c1-400
fi
