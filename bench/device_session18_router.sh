#!/usr/bin/env bash
# Session 18, #17.3 / #22.5 routing cost (one H200, < 150 s).
# 1) with ROUTER_TESTS=1 (and in the dry run): the router's CUDA tests (session 17's
#    tie-order fix; call 2 of session 18 ran them: 5 passed), the row top-k vs its reference
#    and torch.topk, the unroll tiles, the cost tests;
# 2) `moska.bench.router_overlap` at B = 1,024 / 256 / 64 (8B dims, 1M shared tokens in
#    4,096-token chunks, top-8, 4,096 unique tokens a request, CUDA graphs), routers
#    default (key-max per KV head), two_stage and default_p2 (key-max grid capped at 2
#    programs per SM; rows past the budget are skipped): each part alone (router, shared, unique,
#    merge), the step in 7 stream schedules (serial = the old; unique or route on a side
#    stream, high priority, unique split in 4 launches, the router on a green context of
#    32 / 64 SMs with the unique attention on the rest), eager and graph, the floor from a read stream and the bf16 matmul peak measured
#    in the same run, the critical path router + shared + merge the dependencies force; the
#    default's scores as torch.matmul + amax vs the fused kernel; every router's chosen
#    chunks vs the fp32 reference on fresh random inputs (rows clear of fp16 ties).
# 3) with --corun-batch: router_corun's probe: the default router (own grid, 1 and 2
#    programs per SM) and its key-max scores at one program per SM in 4 tiles (32 or 64
#    requests, 4 or 8 warps) beside a persistent read stream (2 / 4 programs per SM) over
#    the unique KV's bytes, alone and together in both orders (the overlap fraction).
#    Call 5 (the router and streams of 1 / 2 / 4 per SM): router_corun_h200_session18.json.
# Carry .whl-min (or .whl). JSON: $OUT/router_overlap_session18.json; table last.
# `bash bench/device_session18_router.sh --cpu-dry-run`: the same steps in CPU forms.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1
  TESTS="tests/kernels/test_router_topk.py tests/bench/test_router_overlap.py"; TT=200
  RARGS="--cpu-dry-run --batch 4 --routers default two_stage --corun-batch 4"; LEFT=400
else
  PY=python3; export TRITON_INTERPRET=0
  WHL=.whl-min; [ -d "$WHL" ] || WHL=.whl
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_router18 "$WHL"/*.whl
  export PYTHONPATH=/tmp/site_router18:$PWD
  TESTS="-m cuda tests/kernels/test_router_topk.py tests/routing/test_router_unroll.py"
  TESTS="$TESTS tests/routing/test_router_cost.py"; TT=40
  # call 6 (default): B = 1,024, the default router and the default at one program per SM
  # with 64-request 8-warp tiles (the same chunks), 3 schedules, then the co-run probe
  # (router_corun.py); ROUTER_FULL=1: call 3's full sweep (B = 1,024 / 256 / 64, 3 routers,
  # 7 schedules, the GEMM form)
  RARGS="--batch 1024 --routers default default_p1_b64w8s4 default_p1_b64w8s3"
  RARGS="$RARGS --schedules serial prio route_side --gemm-block 0"
  RARGS="$RARGS --corun-batch 1024"; LEFT=143
  [ "${ROUTER_FULL:-0}" = 1 ] && RARGS="--batch 1024 256 64 --routers default two_stage default_p2
    --schedules serial unique_side route_side prio route_side_split4 green32 green64"
fi
if [ "${ROUTER_TESTS:-0}" = 1 ] || [ -n "${TRITON_INTERPRET#0}" ]; then
  # shellcheck disable=SC2086
  timeout $TT $PY -m pytest -q -s -p no:cacheprovider -rs $TESTS > "$OUT/router_tests.log" 2>&1
  echo "router tests rc=$? ($(( $(date +%s) - T0 )) s)"
  grep -E "passed|failed|Error|SKIP" "$OUT/router_tests.log" | tail -6 | cut -c1-300
fi
TR=$(( LEFT - ($(date +%s) - T0) ))
# rows are not started past the budget; the JSON and table come after the last row
# shellcheck disable=SC2086
timeout $TR $PY -m moska.bench.router_overlap $RARGS --budget-s $(( TR - 25 )) --out "$OUT/router_overlap_session18.json" \
  > "$OUT/router_overlap.log" 2>&1
echo "router overlap rc=$? ($(( $(date +%s) - T0 )) s)"
grep -E "Error|error" "$OUT/router_overlap.log" | tail -3 | cut -c1-300
sed -n '/^    B router/,$p' "$OUT/router_overlap.log" | grep -v "_p[12]_with" | cut -c1-220
