#!/usr/bin/env bash
# #15.4, session 17: `moska bench load` bursts on the device's idle CPU cores (no GPU:
# CUDA_VISIBLE_DEVICES= ; the built-in tiny model), scored by the drain the issue means.
# Each sampled 429 (about 100 a burst, every k-th of each kind: load_retry.sample_every)
# is retried dry with its OWN body at half, once and twice its promise (retry-after-ms):
# within 2x = refused at half and admitted at twice (load_retry; the probes' nearest-length
# reopening, sessions 12-16, stays beside it as `retry_after_ms_within_2x_share`).
# 2x2 A/B of session 17's two predictor changes, all with a library (half the requests on
# `demo`, as #15.4 asks) and the loop lag in door drains (call 1: off was worse, 0.40-0.43
# vs 0.59-0.68 of 429s within 2x): (a) `--promise-learning on|off`: drains scaled per group
# (plain / library x door / queue) by how the server's own recent promises came out
# (admission_promises.PromiseScale); (b) `--door-wait open|empty`: a drain waits until the
# door lets a retry in (retry_drain.door_opens_s) or until it is empty (before). off:empty
# is session 16's predictor, the default again after call 2 (0.71 within 2x vs 0.39-0.57 for
# the others). (Call 1, at 02:18 on e609c5c's tree, was the 2x2 of learning
# x lag.) 4 servers, each pinned to 4 cores (taskset), its bursts of 64, 300, 1,000
# clients x3 in one server (the first burst pays the library's load). `--trace`: the
# per-request parts (gzipped after).
# Correctness first (~5 s): the promise logic's and the drain scorings' unit tests.
# Run: `bash bench/device_lead.sh session17_load`, carry .whl only (fastapi, uvicorn, ...);
# it takes all 16 cores (a phase of its own or beside GPU-only scripts). < 150 s in all.
# `bash bench/device_session17_load.sh --cpu-dry-run`: small bursts, one repeat, 2 servers.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}
  BURSTS=${BURSTS:-16,48}; ARMS=${ARMS:-"on:on:open"}; CORES=1; LIMIT=200; TT=120
else
  PY=python3
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_load .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site_load:$PWD
  BURSTS=64,300,1000,64,300,1000,64,300,1000; ARMS="on:on:open off:on:empty off:on:open on:on:empty"; CORES=4
  LIMIT=132; TT=30
fi
timeout $TT $PY -m pytest -q -p no:cacheprovider tests/server/test_admission_promises.py \
  tests/server/test_load_drain.py tests/server/test_load_probe_series.py \
  tests/server/test_admission_burst_promises.py > "$OUT/tests.log" 2>&1
echo "tests rc=$? ($(( $(date +%s) - T0 )) s): $(tail -1 "$OUT/tests.log" | cut -c1-120)"
# the cores this process may use (a container's may not start at 0), CORES to a server
read -r -a CPUS <<< "$($PY -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
NCPU=${#CPUS[@]}; i=0
for arm in $ARMS; do  # learn:lag:wait
  IFS=: read -r learn lag wait <<< "$arm"
  first=$(( (i * CORES) % NCPU )); i=$((i + 1))
  PIN=""
  if command -v taskset > /dev/null && [ $(( first + CORES )) -le "$NCPU" ]; then
    PIN="taskset -c $(IFS=,; echo "${CPUS[*]:$first:$CORES}")"
  fi
  echo "server learn=$learn door-lag=$lag door-wait=$wait on cores: ${PIN:-any}"
  name="load_demo_learn_${learn}_lag_${lag}_wait_${wait}"
  # shellcheck disable=SC2086
  timeout $(( LIMIT - ($(date +%s) - T0) )) $PIN $PY -m moska.bench.load --burst "$BURSTS" \
    --ttft-slo 5 --library demo --library-share 0.5 --trace --promise-learning "$learn" \
    --door-lag "$lag" --door-wait "$wait" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 &
done
wait
echo "bursts done ($(( $(date +%s) - T0 )) s)"
$PY -m moska.bench.load_session17 "$OUT"
for f in "$OUT"/load_*.log; do
  grep -q "^OK" "$f" || { echo "== $(basename "$f"): $(grep -i "error\|Traceback\|assert" "$f" | head -2 | cut -c1-200) $(tail -1 "$f" | cut -c1-200)"; }
done
gzip -f "$OUT"/load_*.json
echo "total $(( $(date +%s) - T0 )) s"
