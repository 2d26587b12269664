#!/usr/bin/env bash
# #15.4, session 20: `moska bench load` bursts with retry bookings (server/bookings.py) on the
# device's idle CPU cores (no GPU: CUDA_VISIBLE_DEVICES= ; the built-in tiny model), where a
# library prefill fits the 5 s SLO (on the 2-core dev box it takes ~7 s alone, so session 19
# could not measure library requests). Bursts of 64, 300, 1,000 clients, half on the `demo`
# library. Arms `bookings:obey`: clients that obey retry-after-ms and re-send the same body up
# to 2 times as the OpenAI SDK does (load_obey), bookings on (x3) and off; and the dry
# own-retry score (nobody retries; dry retries at half / once / twice the promise), on and off.
# An arm `bookings:obey:gpu` runs its engine on that GPU (`--device cuda`; else on the CPU).
# Each server pinned to 4 cores (taskset) from core FIRST_CORE on (the CUDA tests may hold the
# cores below it). Call 1 (09:45, HEAD 385f1ad, x2, 6 CPU servers beside the CUDA tests):
# obeying clients, bookings on: SLO of all admitted 0.59 / 0.64 / 0.56 (off 0.86), library
# clients 0.02 on the first retry; the show rate fell to 0.03 at each 1,000 burst (the SDK's
# last 429s lapse), the booked queue then counted as empty, and 150 retries admitted together
# got their first token 11 s later. Call 2: show rates by try, long library prompts booked
# with their moment alone, booked retries refused again at the door: CPU 1,000 bursts SLO
# 0.63, library first retry 0.00 -> 0.11-0.62 by size; 3 of 4 GPU servers out of GPU memory
# (two engines per H200 do not fit: one GPU server per GPU). Call 3 (max_pace 8, one round,
# `BURSTS=64,300,1000 ARMS="on:2 on:2 on:2 on:2 on:2:0 on:2:1 on:0" SLIMIT=400 LIMIT=470`):
# CPU SLO 0.97 / 0.99 / 0.72, GPU 1.00 / 1.00 / 0.82; dry own-retry within 2x 0.96.
# Session 21 call 1 (HEAD 7c31dd5, `BURSTS=64,300,1000 ARMS="on:2 on:2 on:2:0 on:2:1 on:0
# off:2" SLIMIT=350 LIMIT=395`): GPU sampled within 2x 1.00 / 1.00 / 0.34 and 0.93 / 0.79 /
# 0.97 (the 0.34: a first 1,000 storm at pace 1), SLO 1.00; CPU obey servers only finished
# their 64 burst (0.27, 0.48); dry own-retry 1.00 (221). An arm's 4th field, bursts
# separated by `/`, overrides BURSTS for that server (`on:2:0:1000/300`; `on:2::64/64` CPU).
# LIB=none: plain bursts (default demo). TRACE=1: `--trace` (decisions, door 429s, steps, GC pauses); An 8th field is `--gc-freeze` (on/off). A 6th field is `--booked-headroom` (default: the server's), a 7th `--booked-by-send` (on/off). A 5th field is `--storm-bound` (auto/on/off, default auto: session 24's A/B, `on:2:0:64/300/1000:on`).
# SLIMIT: the servers' cap (s); device_lead's LIMIT must leave time for the summary. Correctness first: the bookings', obeying clients' and promises' unit tests.
# Run: `bash bench/device_lead.sh session20_load`, carry .whl. `--cpu-dry-run`: small, 1 arm.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}
  BURSTS=${BURSTS:-16,48}; ARMS=${ARMS:-"on:2"}; CORES=1; LIMIT=${LIMIT:-300}; TT=200
else
  PY=python3
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_load .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site_load:$PWD
  BURSTS=${BURSTS:-64,300,1000,64,300,1000}
  ARMS=${ARMS:-"on:2 off:2 on:2 on:0 on:2 off:0"}
  CORES=4; LIMIT=${SLIMIT:-420}; TT=60
fi
timeout $TT $PY -m pytest -q -p no:cacheprovider --noconftest tests/server/test_bookings.py \
  tests/server/test_admission_promises.py tests/bench/test_load_obey.py \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$? ($(( $(date +%s) - T0 )) s): $(tail -1 "$OUT/tests.log" | cut -c1-120)"
read -r -a CPUS <<< "$($PY -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
NCPU=${#CPUS[@]}; i=0; FIRST=${FIRST_CORE:-0}
for arm in $ARMS; do
  IFS=: read -r book obey gpu bursts sb bh bbs gcf <<< "$arm"
  bursts=${bursts:-$BURSTS}; bursts=${bursts//\//,}
  DEV=cpu; VIS=""
  if [ -n "${gpu:-}" ]; then DEV=cuda; VIS=$gpu; fi
  first=$(( FIRST + (i * CORES) % (NCPU - FIRST) )); i=$((i + 1))
  PIN=""
  if command -v taskset > /dev/null && [ $(( first + CORES )) -le "$NCPU" ]; then
    PIN="taskset -c $(IFS=,; echo "${CPUS[*]:$first:$CORES}")"
  fi
  echo "server bookings=$book obey=$obey device=$DEV${VIS} on cores: ${PIN:-any}"
  name="load_bookings_${book}_obey_${obey}_${DEV}_sb_${sb:-auto}${bh:+_bh_$bh}${bbs:+_bbs_$bbs}${gcf:+_gcf_$gcf}_$i"
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=$VIS timeout $(( LIMIT - ($(date +%s) - T0) )) $PIN $PY -m moska.bench.load \
    --burst "$bursts" --ttft-slo 5 --library "${LIB:-demo}" --library-share 0.5 --bookings "$book" \
    --obey-retries "$obey" --device "$DEV" --storm-bound "${sb:-auto}" ${TRACE:+--trace} ${gcf:+--gc-freeze $gcf} ${bh:+--booked-headroom $bh} ${bbs:+--booked-by-send $bbs} --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 &
done
wait
echo "bursts done ($(( $(date +%s) - T0 )) s)"
$PY -m moska.bench.load_session20 "$OUT"
for f in "$OUT"/load_*.log; do
  grep -q "^OK" "$f" || { echo "== $(basename "$f"): $(grep -i "error\|Traceback\|assert" "$f" | head -2 | cut -c1-200) $(tail -1 "$f" | cut -c1-200)"; }
done
gzip -f "$OUT"/load_*.json
echo "total $(( $(date +%s) - T0 )) s"
