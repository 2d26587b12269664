#!/usr/bin/env bash
# Session 16, #19 (nvidia-h200-x2, both GPUs, ~200 s; run it alone in its phase: part (a)
# needs idle cores): P/D vs colocated, the CPU trace and the 2-GPU trace at once.
# (a) The CPU trace (tiny model, --cpu-dry-run, no GPU) on the device's idle cores: the
#     issue's target is stated on it, and the 2-core dev box, loaded by the other developers
#     (load 6-13), cannot time it. Since session 16 the front end sends an instance's
#     prefills one at a time in admission order (`pd/prefill_gate.py`): the instance had
#     batched every prompt waiting at a step, so a burst's prompts ended together (6 prompts
#     as one 0.9 s step, each predicted 0.1-0.4 s: session 14's "~1 s per request after the
#     warm-up"), and the stage line then learnt a slope of ~5 and rejected the round. Rates
#     80 and 120 req/s (240 and 360 requests a replay), 3 alternating rounds per system,
#     TTFT SLO 1 s, TPOT SLO 0.1 s; summary.regime = the lowest rate where colocated met the
#     TTFT SLO for < 80% of all requests (the target: there, P/D keeps >= 95% of admitted
#     within both SLOs and has the higher goodput). Then P/D alone with the gate off, the
#     A/B of the fix on the same cores.
# (b) The GPU trace, session 15's v7 (never run), at rates where colocated should miss the
#     TTFT SLO: session 15's last run had colocated within it for 99-100% at 60-100 req/s,
#     so 140 and 200 (2 rounds, 40 requests per 20 req/s: 2 s replays); P/D 1:1 (prefill
#     GPU 0, decode GPU 1) vs 2 colocated instances (one per GPU), a random 8B-dim 16-layer
#     checkpoint with a tokenizer, ~4K-token prompts, 16-48 output tokens, TTFT SLO 0.3 s,
#     TPOT 0.03 s, a warm-up of 48 at 24 req/s. The trace is prefill-bound: P/D has one
#     prefill GPU against colocated's two (session 15: P/D capped at ~40 req/s).
# Call 1 (00:02, v2 of this script, 146 s on nvidia-h200-x2): CPU at 50 / 80 req/s:
#   colocated within TTFT 100 % / 75 % (rounds 100, 100, 25 %), P/D 100 % of admitted within
#   both in all 6 rounds, goodput 0.66x / 3.96x (gate off: 100 %, 15.0 / 15.7 vs 17.1 / 19.6
#   req/s); GPU at 140 / 200: colocated within TTFT 7 % / 8 %, P/D 91.7 % / 90.4 % within
#   both (round 0 after the warm-up 81 / 85 %), goodput 21x / 6.8x, P/D admitting ~20 req/s.
# v3 (this): CPU at 80 (again) and 120; the GPU queue counts each held prefill at its
#   learnt service time (3dbcb80), and P/D alone at 140 with the gate off and 2 wide.
# Correctness first: the pd tests of the gate, the transfer retry and session 15's fixes
# (CPU, ~15 s).
# Run: `bash bench/device_lead.sh session16_pd` on nvidia-h200-x2, carry .whl only (the 8B
# checkpoint is written there, the tiny model is built in). CPU form (checked on the dev
# box): `bash bench/device_session16_pd.sh --cpu-dry-run`.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # (KINDS.md)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/pd16.log; : > "$LOG"  # every step's output, one file
step() { echo "=== $1 rc=$2 ($(( $(date +%s) - T0 )) s)" | tee -a "$LOG"; }
T0=$(date +%s)
NC=$(nproc)
CPU_TRACE="--cpu-dry-run --requests 120 --rate 40 --rates 80,120 --rounds 3 --ttft-slo 1 \
  --tpot-slo 0.1"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; DEV=cpu; SLOW=3  # timeouts x3: 2 shared cores
  CPU_TRACE="--cpu-dry-run --requests 20 --rate 40 --rates 40,60 --rounds 1 --ttft-slo 1 \
    --tpot-slo 0.1"
  GPU_AB_RATE=8
  GPU_TRACE="--cpu-dry-run --requests 12 --rate 4 --rates 8 --rounds 1 --warmup 8 \
    --warmup-rate 8 --output-tokens 8,24 --ttft-slo 1.5 --tpot-slo 0.1"
else
  PY=python3; DEV=cuda; SLOW=1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
  GPU_TRACE="--device cuda --model /tmp/rand8b16 --block-tokens 512 --max-model-len 8192 \
    --requests 40 --rate 20 --rates 140,200 --rounds 2 --warmup 48 --warmup-rate 24 \
    --output-tokens 16,48 --ttft-slo 0.3 --tpot-slo 0.03 \
    --instance-args=--gpu-memory-utilization=0.42"
fi
# the CPU trace on the upper half of the cores, the GPU trace's processes on the lower
PIN_CPU=""; PIN_GPU=""
if [ "$DEV" = cuda ] && [ "$NC" -ge 16 ] && command -v taskset > /dev/null; then
  PIN_CPU="taskset -c $((NC / 2))-$((NC - 1))"; PIN_GPU="taskset -c 0-$((NC / 2 - 1))"
fi
echo "cores $NC pin_cpu '$PIN_CPU' pin_gpu '$PIN_GPU' load $(cut -d' ' -f1-3 /proc/loadavg)" \
  | tee -a "$LOG"
if [ "$DEV" = cuda ]; then
  timeout 60 $PY -m moska.bench.random_checkpoint /tmp/rand8b16 --layers 16 --device cuda:0 \
    >> "$LOG" 2>&1 &
  CKPT=$!
fi
CUDA_VISIBLE_DEVICES= timeout $((40 * SLOW)) $PY -m pytest -q -p no:cacheprovider \
  tests/pd/test_pd_prefill_gate.py tests/pd/test_pd_one_event.py \
  tests/pd/test_pd_probe_slo.py tests/pd/test_pd_transfer_blocks.py \
  tests/pd/test_pd_late_streams.py tests/pd/test_pd_admission_timeline.py \
  tests/pd/test_pd_shm.py \
  >> "$LOG" 2>&1; step tests $?
# (a) CPU trace, no GPU visible, in the background; then, while the GPU trace runs, P/D
# alone with the gate off (--prefill-width 0: the old all-at-once), the A/B of the fix
(
  CUDA_VISIBLE_DEVICES= $PIN_CPU timeout $((130 * SLOW)) $PY -m moska.bench.trace $CPU_TRACE \
    --out "$OUT/pd_trace_cpu16.json" > "$OUT/cpu_trace.log" 2>&1
  echo "=== cpu_trace rc=$? ($(( $(date +%s) - T0 )) s)"
  CUDA_VISIBLE_DEVICES= $PIN_CPU timeout $((60 * SLOW)) $PY -m moska.bench.trace $CPU_TRACE \
    --systems pd --prefill-width 0 --out "$OUT/pd_trace_cpu16_nogate.json" \
    > "$OUT/cpu_trace_nogate.log" 2>&1
  echo "=== cpu_trace_nogate rc=$? ($(( $(date +%s) - T0 )) s)"
) >> "$LOG" 2>&1 &
CPUT=$!
# (b) GPU trace
if [ "$DEV" = cuda ]; then
  wait $CKPT; step checkpoint $?
fi
$PIN_GPU timeout $((130 * SLOW)) $PY -m moska.bench.trace $GPU_TRACE \
  --out "$OUT/pd_trace_2gpu16.json" >> "$LOG" 2>&1; step gpu_trace $?
# (b') P/D alone at the first rate with the gate off (0) and two wide (2): on the GPU a
# step batches prompts well, and call 1's gated P/D admitted ~20 req/s (session 15's,
# ungated, ~40)
for W in 0 2; do
  $PIN_GPU timeout $((45 * SLOW)) $PY -m moska.bench.trace $GPU_TRACE --systems pd \
    --rates "${GPU_AB_RATE:-140}" --prefill-width $W --out "$OUT/pd_trace_2gpu16_w$W.json" \
    >> "$LOG" 2>&1; step gpu_trace_w$W $?
done
wait $CPUT; grep "=== cpu" "$LOG"
grep -h "Traceback\|Error:\|FAILED" "$LOG" "$OUT"/cpu_trace*.log | head -6 | cut -c1-300
$PY - "$OUT" <<'PY'
import json, sys
keys = ("goodput_rps", "within_both_slos_of_admitted", "within_ttft_slo_of_all",
        "rejected_429", "ttft_p99_s")
print("file rate system goodput both_of_admitted ttft_of_all 429 ttft_p99 | pd/colo | rounds")
for name in ("pd_trace_cpu16", "pd_trace_cpu16_nogate", "pd_trace_2gpu16",
             "pd_trace_2gpu16_w0", "pd_trace_2gpu16_w2"):
    try:
        d = json.load(open(f"{sys.argv[1]}/{name}.json"))
    except Exception as e:  # noqa: BLE001
        print(name, "no JSON:", e)
        continue
    for rate, v in d.get("by_rate", {}).items():
        g = {k: v.get(k, {}).get("goodput_rps") for k in ("colocated", "pd")}
        ok = g["pd"] is not None and g["colocated"]
        ratio = round(g["pd"] / g["colocated"], 2) if ok else None
        for k in ("colocated", "pd"):
            if k in v:  # per round: colocated's TTFT share, P/D's both-of-admitted share
                m = "within_ttft_slo_of_all" if k == "colocated" else "within_both_slos_of_admitted"
                rounds = [(r.get(m), r.get("goodput_rps")) for r in v[k].get("per_round", [])]
                print(name[9:], rate, k, *[v[k].get(m) for m in keys], "|", ratio, "|", rounds)
    if "nogate" not in name and "_w" not in name:
        print(name[9:], "regime", d.get("summary", {}).get("regime"))
PY
