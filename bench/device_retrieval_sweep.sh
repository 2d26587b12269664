#!/usr/bin/env bash
# Issue 17: several retrieval-model trainings at once on one H200 (each is small; one alone
# leaves the GPU mostly idle), MINUTES each; every model and log comes back under $OUT.
# CONFIGS: space-separated name:extra-args (% for spaces inside the args).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MINUTES=${MINUTES:-7}
# measured (train_retrieval_sweep2_h200.json): only tied embeddings learn the lookup in minutes
CONFIGS=${CONFIGS:-"tied:--workers%6"}
pids=()
for c in $CONFIGS; do
  name=${c%%:*}; extra=${c#*:}; extra=${extra//%/ }
  ( timeout "$(python3 -c "print(int(float('$MINUTES') * 60 + 150))")" python3 -m moska.bench.train_retrieval \
      --out ".models/ret-$name" --context 4096 --steps 100000 --max-minutes "$MINUTES" \
      --batch 16 --log-every 500 --save-dtype bfloat16 --workers 3 $extra \
      > "$OUT/train_$name.log" 2>&1
    mkdir -p "$OUT/ret-$name"; cp -r ".models/ret-$name"/. "$OUT/ret-$name/" ) &
  pids+=($!)
done
wait "${pids[@]}"
for c in $CONFIGS; do name=${c%%:*}; echo "== $name"; grep '"answer_acc"' "$OUT/train_$name.log" | tail -3; done
