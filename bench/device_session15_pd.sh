#!/usr/bin/env bash
# Session 15, #19 on 2 GPUs (nvidia-h200-x2, ~135 s): the P/D vs colocated trace, again.
# Session 15's first run (device_session14_pd.sh) read TPOT 0.0 in every row: the random
# 8B-dim checkpoint had no tokenizer, so the server streamed no text until a request's end
# and sent its whole output in one final event. The client took that event for the first
# token (TTFT = the whole request) and the P/D front end learnt it as the decode stage's
# first token (~0.13 s of a 0.3 s TTFT SLO, against ~0.005 s of step fit), so it left ~0.1 s
# for the prefill queue and answered 429 to 78-85% at 50/60/80 req/s. Now the checkpoint
# gets a tokenizer (every token adds text: one event per token, TPOT measured), the front
# end no longer learns a first token from a stream's only event, and the client counts such
# a request `unmeasured` (never within an SLO). The nccl_p2p step of session 14 is dropped
# (measured: 308 GB/s).
# Second version (after the 21:00 run of the first: TPOT measured, p50 5-9 ms; P/D goodput
# 28.8 vs 27.5 req/s at 40, but 3-6 req/s at 60-100 with 12-47% of the admitted within
# both SLOs, where its front end saw admission -> first token p50 0.15-0.19 s and the client
# TTFT p50 0.48-0.86 s): the client replays from a process of its own with its bodies built
# before each replay (moska/bench/trace_client.py); in the front ends' process it sent
# requests up to 0.9-2 s late (its lag counted as TTFT) and slowed the front ends' loops.
# per_request rows now end with each request's send lag; summaries give send_lag_p99_s.
# Also since 21:00: the stage counts the transfer of all the prompt's blocks (as sent); an
# idle prefill instance locked out by a burst-learnt line (0.32 s predicted at the upper
# end, 0.04-0.07 s seen at idle: 1.5-2 s of 429s at 80-100 req/s) is probed after one TTFT
# SLO of quiet (was 1 s) and at once while the probes beat their predictions.
# Fourth version (after the 21:30 run of v3: P/D 97-100% of the admitted within both SLOs at
# 40-80 req/s, 93% at 100, send lag p99 <= 6 ms; but with 16-48 output tokens the trace is
# prefill-bound: P/D's one prefill GPU capped its goodput at ~40 req/s while the colocated
# pair, both GPUs prefilling, met both SLOs for 97-100% up to 100 req/s; and colocated's
# first replay (warm-up: 8 requests at 4 req/s) ran ~20x slow, which alone made 40 req/s
# "the regime"): rates 60/100/140 (to find where colocated misses the TTFT SLO; 180
# would put ~5.8K token events/s through the colocated front end) and a
# warm-up of 48 requests at 24 req/s for both systems (`--warmup-rate`). Outputs stay at
# 16-48 tokens: the front ends relay every token event in one Python process (~0.1-0.2 ms
# each, CPU-measured), and 96-288 tokens (Mooncake's ~180 average) at 80 req/s would be
# ~15K events/s: a bench of the front ends' CPU, not of the GPUs. The
# decode instance counts as slower when the median stream in flight is late, not the latest
# (v3: one stalled stream of 20-27 put TPOT at ~0.03 s: 8-35 TPOT 429s a round, clients
# seeing p99 0.015-0.02 s).
# 1) a random-weight checkpoint at Llama-3.1-8B layer dims, 16 layers, 32k vocab, with a
#    word-level tokenizer (`random_checkpoint.write_tokenizer`);
# 2) correctness: the session-15 tests of these fixes (CPU, ~5 s: tests/pd/test_pd_one_event.py,
#    test_pd_trace_client.py, test_pd_probe_slo.py, test_pd_transfer_blocks.py,
#    test_pd_late_streams.py);
# 3) trace replay, P/D 1:1 (prefill GPU 0, decode GPU 1, early rejection) vs 2 colocated
#    instances (one per GPU, round robin), both systems up at once (0.42 of each GPU's
#    memory each), synthetic trace (~4K-token prompts, 16-48 output tokens) at 60/100/140
#    req/s, 2 rounds each; TTFT SLO 0.3 s, TPOT SLO 0.03 s; summary.regime = the lowest
#    rate where colocated met the TTFT SLO for < 80% of requests.
# Run: `bash bench/device_lead.sh session15_pd` on nvidia-h200-x2, carry .whl only (the model
# is written there). CPU form: `bash bench/device_session15_pd.sh --cpu-dry-run` (checked).
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # (KINDS.md)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/pd15.log; : > "$LOG"  # every step's output, one file
step() { echo "=== $1 rc=$2 ($(( $(date +%s) - T0 )) s)" | tee -a "$LOG"; }
T0=$(date +%s)
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; DEV=cpu; SLOW=4  # timeouts x4: 2 shared cores
  TRACE="--cpu-dry-run --requests 12 --rate 4 --rates 4,8 --rounds 1 --warmup 8 --warmup-rate 8 \
    --output-tokens 8,24 --ttft-slo 1.5 --tpot-slo 0.1"
else
  PY=python3; DEV=cuda; SLOW=1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
  TRACE="--device cuda --model /tmp/rand8b16 --block-tokens 512 --max-model-len 8192 \
    --requests 60 --rate 20 --rates 60,100,140 --rounds 2 --warmup 48 --warmup-rate 24 \
    --output-tokens 16,48 --ttft-slo 0.3 --tpot-slo 0.03 \
    --instance-args=--gpu-memory-utilization=0.42"
fi
if [ "$DEV" = cuda ]; then
  timeout 60 $PY -m moska.bench.random_checkpoint /tmp/rand8b16 --layers 16 --device cuda:0 \
    >> "$LOG" 2>&1 &
  CKPT=$!
fi
timeout $((30 * SLOW)) $PY -m pytest -q -p no:cacheprovider tests/pd/test_pd_one_event.py \
  tests/pd/test_pd_trace_client.py tests/pd/test_pd_probe_slo.py tests/pd/test_pd_transfer_blocks.py \
  tests/pd/test_pd_late_streams.py \
  >> "$LOG" 2>&1; step tests $?
if [ "$DEV" = cuda ]; then
  wait $CKPT; step checkpoint $?
  ls /tmp/rand8b16 >> "$LOG"
fi
timeout $((125 * SLOW)) $PY -m moska.bench.trace $TRACE --out "$OUT/pd_trace_2gpu.json" \
  >> "$LOG" 2>&1; step trace $?
$PY - "$OUT" <<'PY'
import json, sys
try:
    d = json.load(open(f"{sys.argv[1]}/pd_trace_2gpu.json"))
except Exception as e:  # noqa: BLE001
    sys.exit(f"pd_trace_2gpu no summary: {e}")
s = d.get("summary", {})
print("regime", s.get("regime"), "pd/colocated goodput", s.get("pd_goodput_over_colocated"))
keys = ("goodput_rps", "within_both_slos_of_admitted", "within_ttft_slo_of_all",
        "rejected_429", "ttft_p99_s", "tpot_p99_s", "unmeasured")
print("rate system " + " ".join(keys) + " send_lag_p99_s")
for rate, v in d.get("by_rate", {}).items():
    for k in ("colocated", "pd"):
        if k in v:
            row = [v[k].get(m) for m in keys]
            extra = v[k].get("tpot_p50_s"), v[k].get("stage_pred_over_observed")
            print(rate, k, *row, v[k].get("send_lag_p99_s"), "tpot_p50", extra[0],
                  "stage", extra[1])
print("placement", json.dumps(d.get("placement")))
PY
grep -i "error\|traceback" "$LOG" | head -8 | cut -c1-300
