#!/usr/bin/env bash
# Routing fidelity on the GPU (issue 17). Needs .models/moska-code-20m (a copy of
# shared/models/moska-code-20m; .models/ is git-ignored, carry it). Results under $OUT.
# Step 1 trains the retrieval model into .models/retrieval-4k (kept while the machine is
# warm); later steps read it. Run the steps as separate device calls (each < 10 min):
#   STEP=train bash bench/device_fidelity.sh
#   STEP=retrieval bash bench/device_fidelity.sh
#   STEP=code bash bench/device_fidelity.sh
#   STEP=rank bash bench/device_fidelity.sh
#   STEP=decode bash bench/device_fidelity.sh
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export MOSKA_GIT_COMMIT=${MOSKA_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
MODEL=.models/retrieval-4k
case "${STEP:-train}" in
  train)
    # 6 minutes of training (the lr schedule ends with the time), then a 256-question check
    # at 4,096 tokens; saved in bf16 (half the float32 file, which is too big to come back).
    # RESUME=1 continues from the model a previous call left in $MODEL (machine still warm);
    # EXTRA: more train_retrieval flags (e.g. the winner of bench/device_retrieval_sweep.sh).
    timeout 560 python3 -m moska.bench.train_retrieval --out "$MODEL" --context 4096 \
      --steps 30000 --max-minutes 6 --batch 16 --log-every 250 --save-dtype bfloat16 \
      ${RESUME:+--resume} ${EXTRA:-} \
      2>&1 | grep -v "Writing model shards" | tee "$OUT/train_retrieval.log"
    cp "$MODEL/train_log.json" "$OUT/"; mkdir -p "$OUT/retrieval-4k"; cp -r "$MODEL"/. "$OUT/retrieval-4k/" ;;
  retrieval)
    timeout 560 python3 -m moska.bench.fidelity --retrieval-model "$MODEL" --device cuda \
      --dtype bfloat16 --modes prefix independent --chunk-sizes 64 256 1024 --questions 256 \
      --out "$OUT/fidelity_retrieval.json" 2>&1 | grep -v "it/s\]" | tail -80 ;;
  code)
    timeout 560 python3 -m moska.bench.fidelity --code-model .models/moska-code-20m \
      --device cuda --dtype bfloat16 --modes prefix independent --chunk-sizes 64 256 1024 \
      --library-tokens 3072 --targets 4 --target-tokens 512 --study \
      --out "$OUT/fidelity_code_gpu.json" 2>&1 | grep -v "it/s\]" | tail -80 ;;
  rank)
    timeout 300 python3 -m moska.bench.fidelity_rank --model "$MODEL" --retrieval-model \
      --device cuda --dtype bfloat16 --chunk-size 64 --out "$OUT/fidelity_rank_retrieval.json"
    timeout 200 python3 -m moska.bench.fidelity_rank --model .models/moska-code-20m \
      --device cuda --dtype bfloat16 --out "$OUT/fidelity_rank_code_gpu.json" ;;
  decode)  # per-KV-head routing with the two-stage scorer (the key-max default's decode
    # step: bench/device_session13_routing.sh; moska.bench.decode's default scorer is key-max)
    timeout 250 python3 -m moska.bench.decode --scorer two_stage --cuda-graph \
      --out "$OUT/decode_routing_default.json" 2>&1 | tail -20 ;;
esac
