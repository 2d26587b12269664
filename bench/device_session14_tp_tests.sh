#!/usr/bin/env bash
# #18 session 14 on nvidia-h200-x2 (2 GPUs, NCCL): the TP tests that hung twice on this machine
# (test_tp_graphs.py: its NCCL graph test; test_tp_library.py: its cuda half), now verbose and
# bounded, each file in a pytest of its own (a killed run loses no other file's results):
#   1. test_tp_graphs.py: the CPU cases, then test_tp_graphs_nccl with the worker spawned
#      (as `moska serve` and bench/tp_decode.py, which captured and replayed fine) and forked
#      from the tests' forkserver (the hung runs' start method): an A/B of the start method
#   2. test_tp_library.py (cpu then cuda over NCCL; module-scoped 2-rank sets)
#   3. the NCCL distributed suite (bench/results/README.md) with the time left
# A hang cannot pass unnoticed: rank 0 raises RankFailedError when a worker stops answering
# on the control group (MOSKA_DIST_CONTROL_TIMEOUT_S), pytest dumps rank 0's stacks after
# faulthandler_timeout, a worker still inside one command after MOSKA_DIST_STUCK_DUMP_S
# dumps its own (and is asked to, SIGUSR1, before rank 0 kills it), and `timeout` bounds it.
# Carry .whl. Whole script < 150 s. $OUT: tp_graphs.log, tp_library.log, dist_suite.log.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export MOSKA_TP_CUDA_GRAPHS=1 MOSKA_DIST_STUCK_DUMP_S=40 NCCL_DEBUG=WARN
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$SECONDS
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
PYTEST=(python3 -m pytest -v -s -rs -p no:cacheprovider -p no:randomly --timeout 60
  -o faulthandler_timeout=50 -o log_cli=true -o log_cli_level=WARNING)
python3 -c 'import torch; print("torch", torch.__version__, "gpus", torch.cuda.device_count(),
  "peer", torch.cuda.can_device_access_peer(0, 1))'
timeout 80 "${PYTEST[@]}" tests/distributed/test_tp_graphs.py > "$OUT/tp_graphs.log" 2>&1
echo "test_tp_graphs rc=$? ($((SECONDS - start)) s)"
timeout 50 "${PYTEST[@]}" tests/distributed/test_tp_library.py > "$OUT/tp_library.log" 2>&1
echo "test_tp_library rc=$? ($((SECONDS - start)) s)"
for f in tp_graphs tp_library; do
  echo "== $f"
  grep -E "PASSED|FAILED|ERROR|SKIPPED|Timeout|RankFailed|Error:|^E  |Thread 0x|File \"/" \
    "$OUT/$f.log" | grep -v "site-packages/_pytest\|site-packages/pluggy" | awk '!seen[$0]++' \
    | head -40 | cut -c1-300
  tail -2 "$OUT/$f.log" | cut -c1-300
done
left=$((145 - (SECONDS - start)))
if [ "$left" -gt 20 ]; then
  MOSKA_TEST_DEVICE=cuda MOSKA_TEST_BACKEND=nccl timeout "$left" python3 -m pytest -q \
    -p no:cacheprovider -p no:randomly tests/distributed --timeout 60 \
    -o faulthandler_timeout=50 > "$OUT/dist_suite.log" 2>&1
  echo "distributed suite rc=$? ($((SECONDS - start)) s, limit $left s)"
  grep -E "FAILED|ERROR" "$OUT/dist_suite.log" | head -10 | cut -c1-300
  tail -2 "$OUT/dist_suite.log" | cut -c1-300
else
  echo "distributed suite not run: $left s left"
fi
