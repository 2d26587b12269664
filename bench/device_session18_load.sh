#!/usr/bin/env bash
# #15.4, session 18: `moska bench load` bursts on the device's idle CPU cores (no GPU:
# CUDA_VISIBLE_DEVICES= ; the built-in tiny model), scored by each 429's own dry retries at
# half, once and twice its promise (load_retry; within 2x = refused at half, admitted at
# twice; docs/admission.md). A/B of session 18's storm anchor (server/storm_anchor.py):
# during the door's storm the step in progress is predicted to end with the storm (its
# connections still to answer x the loop's time per answer) plus its work not done, and
# each 429 counts down to that moment (memoized door rejections too), where the drain
# before charged "the overrun so far, again", which grows with each 429's time.
# Arms (`--door-anchor`): off (session 16/17's default predictor), plain (plain drains
# anchored), all (library drains too). Call 2 (05:00, 3 repeats, arms off/plain/all/off):
# within 2x 0.56 / 0.70 / 0.72 / 0.47. Call 3 (05:11; a storm is a backlog of >= 16
# connections, storm_anchor.storm_end), arms off/plain/all/all x4: 0.58 / 0.60 / 0.52 / 0.61.
# Call 5 (05:29), arms off/plain/door/door ("door": plain drains and library drains at the
# door anchored): 0.52 / 0.47 / 0.76 / 0.64; "door" is the default since. Call 6: arms
# off/door/door/door, 4 repeats (the default's figure with an off server beside it):
# 0.51 / 0.52 / 0.53 / 0.53. Over calls 2-6: off 0.53, plain 0.58, all 0.61, door 0.59.
# Call 7 (final, ~06:35): arms anchor:early = door:off (the default) vs door:on (door_early.py:
# library requests admitted ahead counted in door drains, and the door refuses on arrival
# what would be refused after its wait; "all": the early door's probe queues behind all
# inside, the stricter form: "on", behind those admission will admit, let more in to be
# refused late on 2 local cores; "all" admitted 3 of 300 in one local burst), off x2.
# Call 7 ran (06:24) with arms door:off / door:all x2: 0.69 vs 0.57 within 2x; stays off.
# 4 servers, each pinned to 4 cores (taskset), bursts of 64, 300, 1,000 clients x4 in one
# server, half the requests on the `demo` library, `--trace` (gzipped after).
# Correctness first (~5 s): the anchor's, the promise logic's and the scorings' unit tests.
# Run: `bash bench/device_lead.sh session18_load`, carry .whl only; it takes all 16 cores.
# < 150 s in all: 140 s cap from the start for the servers (call 2's 9 bursts took 84 s; a burst cut by
# the cap is lost, the finished ones are kept).
# `bash bench/device_session18_load.sh --cpu-dry-run`: small bursts, one arm, one core.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}
  BURSTS=${BURSTS:-16,48}; ARMS=${ARMS:-"door:on"}; CORES=1; LIMIT=200; TT=120
else
  PY=python3
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_load .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site_load:$PWD
  BURSTS=${BURSTS:-64,300,1000,64,300,1000,64,300,1000,64,300,1000}
  ARMS=${ARMS:-"door:off door:all door:on door:off"}
  CORES=4
  LIMIT=140; TT=30
fi
# --noconftest: tests/server/conftest.py imports openai, not on the device (call 2: rc 4)
timeout $TT $PY -m pytest -q -p no:cacheprovider --noconftest tests/server/test_storm_anchor.py \
  tests/server/test_admission_promises.py tests/server/test_load_drain.py \
  tests/server/test_admission_burst_promises.py tests/bench/test_load_drain_ceiling.py \
  tests/server/test_door_early.py \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$? ($(( $(date +%s) - T0 )) s): $(tail -1 "$OUT/tests.log" | cut -c1-120)"
# the cores this process may use (a container's may not start at 0), CORES to a server
read -r -a CPUS <<< "$($PY -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
NCPU=${#CPUS[@]}; i=0
for arm in $ARMS; do
  anchor=${arm%%:*}; early=${arm#*:}
  first=$(( (i * CORES) % NCPU )); i=$((i + 1))
  PIN=""
  if command -v taskset > /dev/null && [ $(( first + CORES )) -le "$NCPU" ]; then
    PIN="taskset -c $(IFS=,; echo "${CPUS[*]:$first:$CORES}")"
  fi
  echo "server door-anchor=$anchor door-early=$early on cores: ${PIN:-any}"
  name="load_demo_anchor_${anchor}_early_${early}_$i"
  # shellcheck disable=SC2086
  timeout $(( LIMIT - ($(date +%s) - T0) )) $PIN $PY -m moska.bench.load --burst "$BURSTS" \
    --ttft-slo 5 --library demo --library-share 0.5 --trace --door-anchor "$anchor" \
    --door-early "$early" \
    --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 &
done
wait
echo "bursts done ($(( $(date +%s) - T0 )) s)"
$PY -m moska.bench.load_session17 "$OUT"
for f in "$OUT"/load_*.log; do
  grep -q "^OK" "$f" || { echo "== $(basename "$f"): $(grep -i "error\|Traceback\|assert" "$f" | head -2 | cut -c1-200) $(tail -1 "$f" | cut -c1-200)"; }
done
gzip -f "$OUT"/load_*.json
echo "total $(( $(date +%s) - T0 )) s"
