#!/usr/bin/env bash
# #18 session 14 on nvidia-h200-x2 (2 GPUs, NCCL): the TP tests that hung twice on this machine
# (test_tp_graphs.py: its NCCL graph test; test_tp_library.py: its cuda half), now verbose and
# bounded, in separate pytest runs (a killed run loses no other run's results):
#   1. test_tp_graphs.py's CPU cases, then test_tp_graphs_nccl with the worker spawned (as
#      `moska serve` and bench/tp_decode.py, which captured and replayed fine)
#   2. test_tp_graphs_nccl with the worker forked from the tests' forkserver (the start method
#      of the hung runs): with 1, an A/B of the start method; if 1's NCCL test did not pass,
#      again spawned with NCCL_GRAPH_REGISTER=0 NCCL_CUMEM_ENABLE=0 (NCCL's side of capture)
#   3. test_tp_library.py (cpu, then cuda over NCCL; module-scoped 2-rank sets)
#   4. the NCCL distributed suite (bench/results/README.md) if more than 25 s are left
# A hang cannot pass unnoticed: rank 0 raises RankFailedError when a worker stops answering on
# the control group (MOSKA_DIST_CONTROL_TIMEOUT_S), pytest dumps rank 0's stacks after
# faulthandler_timeout, a worker still inside one command (or its start) after
# MOSKA_DIST_STUCK_DUMP_S dumps its own, warnings and errors are logged live (log_cli: the
# rank monitor's), and `timeout` bounds each run.
# Carry .whl. Whole script < 150 s. $OUT: tp_graphs.log, tp_graphs_ab.log (forkserver, and
# the NCCL knobs' run if any), tp_library.log, dist_suite.log.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export MOSKA_TP_CUDA_GRAPHS=1 MOSKA_DIST_STUCK_DUMP_S=30 NCCL_DEBUG=WARN
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$SECONDS
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
PYTEST=(python3 -m pytest -v -s -rs -p no:cacheprovider -p no:randomly --timeout 60
  -o faulthandler_timeout=35 -o log_cli=true -o log_cli_level=WARNING)
G=tests/distributed/test_tp_graphs.py
run() {  # run NAME LOG LIMIT_S PYTEST_ARGS...: one bounded pytest appended to $OUT/LOG.log
  local name=$1 log=$2 limit=$3 tmp=/tmp/run_$1.log; shift 3
  if [ "$limit" -lt 10 ]; then echo "== $name not run: $limit s left"; return; fi
  timeout "$limit" "${PYTEST[@]}" "$@" > "$tmp" 2>&1
  echo "== $name rc=$? ($((SECONDS - start)) s, limit $limit s)"
  { echo "=== $name"; cat "$tmp"; } >> "$OUT/$log.log"
  local keep="PASSED|FAILED|ERROR|SKIPPED|Timeout|Fatal|RankFailed|Error:|^E  |Thread 0x"
  grep -E "$keep|^  File |NCCL WARN" "$tmp" | grep -v "_pytest\|pluggy\|threading.py" \
    | awk '!seen[$0]++' | head -40 | cut -c1-300
  tail -1 "$tmp" | cut -c1-300
}
run tp_graphs tp_graphs 65 "$G" -k "not forkserver"
run tp_graphs_fork tp_graphs_ab 35 "$G" -k forkserver
if ! grep -q "test_tp_graphs_nccl\[spawn\] PASSED" "$OUT/tp_graphs.log"; then
  # NCCL's side of graph capture: no user-buffer registration of captured collectives, no
  # cuMem buffers (one run, both knobs: a pass says the hang is there, then narrow it)
  NCCL_GRAPH_REGISTER=0 NCCL_CUMEM_ENABLE=0 run tp_graphs_noreg tp_graphs_ab 35 "$G" \
    -k "nccl and spawn"
fi
lib=$((148 - (SECONDS - start))); lib=$((lib > 40 ? 40 : lib))
run tp_library tp_library "$lib" tests/distributed/test_tp_library.py
left=$((148 - (SECONDS - start)))
if [ "$left" -gt 25 ]; then
  MOSKA_TEST_DEVICE=cuda MOSKA_TEST_BACKEND=nccl timeout "$left" python3 -m pytest -q \
    -p no:cacheprovider -p no:randomly tests/distributed --timeout 60 \
    -o faulthandler_timeout=50 > "$OUT/dist_suite.log" 2>&1
  echo "== distributed suite rc=$? ($((SECONDS - start)) s, limit $left s)"
  grep -E "FAILED|ERROR" "$OUT/dist_suite.log" | head -10 | cut -c1-300
  tail -1 "$OUT/dist_suite.log" | cut -c1-300
else
  echo "== distributed suite not run: $left s left"
fi
