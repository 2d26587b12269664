#!/usr/bin/env bash
# Session 14, #19 on 2 GPUs (nvidia-h200-x2, < 200 s): instances placed one per GPU.
# Second run (after 0b8966b's): 1) and 3)'s CUDA IPC part worked there (device check: only
# its GPU, same tokens; ring 82.9 GB/s, hidden): they run again only with ALL=1. By default:
# NCCL send/recv (rank r on cuda:r; it failed with "Duplicate GPU") and the trace, whose
# P/D front end rejected everything (CPU-sized default step fits, never replaced: the
# warm-up now runs with the SLOs off, then what the front end learnt from it is dropped),
# at 50/60/80 req/s (colocated met the 0.3 s TTFT for 89% at 40, 1.7% at 80), 2 rounds.
# 1) `moska serve --device cuda:1` (tiny model, CUDA graphs on) holds memory on GPU 1 only
#    and answers as on cuda:0 (pd_device_check; in the background while 2) writes);
# 2) a random-weight checkpoint at Llama-3.1-8B layer dims, 16 layers, 32k vocab (~7.5 GB):
#    the trace's model. Not moska-code-20m: on an H200 its steps are host overhead, so a
#    prefill barely slows the decode steps it shares, and the P/D-vs-colocated question
#    (prefill interference against the SLOs) does not arise; 8B-dim layers make a 4K-token
#    prefill chunk ~50 ms against ~10 ms decode steps. 16 layers, not 32: writing it and
#    loading it in 4 processes must fit the session;
# 3) KV transfer prefill (GPU 0) -> decode (GPU 1) at 8B dims: CUDA IPC ring (peer to peer)
#    against gloo in the same run (pd_transfer; checksummed), and NCCL send/recv of the same
#    layers GPU 0 -> GPU 1 (nccl_p2p: the baseline a cross-GPU ring must beat);
# 4) trace replay, P/D 1:1 (prefill GPU 0, decode GPU 1, early rejection) vs 2 colocated
#    instances (one per GPU, round robin), both systems up at once (each GPU holds one of
#    each, 0.42 of its memory each), synthetic trace swept over rates 20/40/80 req/s;
#    summary.regime = the lowest rate where colocated met the TTFT SLO (0.3 s) for < 80%.
# Run: `OUT=$OUT bash bench/device_session14_pd.sh` on nvidia-h200-x2, carry .whl only (the
# model is written there; the device check uses the built-in tiny model). Expected ~150 s
# (ALL=1: ~210 s).
# `bash bench/device_session14_pd.sh --cpu-dry-run` runs the CPU forms (checked: all rc=0).
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # (KINDS.md)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/pd14.log; : > "$LOG"  # every step's output, one file (at most 8 come back)
step() { echo "=== $1 rc=$2 ($(( $(date +%s) - T0 )) s)" | tee -a "$LOG"; }
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; DEV=cpu; SLOW=4  # timeouts x4: 2 shared cores
  CHECK="--device cpu --reference-device cpu"
  XFER="--cpu-dry-run"; NCCL="--cpu-dry-run"
  TRACE="--cpu-dry-run --requests 12 --rate 4 --rates 4,8 --rounds 1 --warmup 4 --ttft-slo 1.5 --tpot-slo 0.1"
else
  PY=python3; DEV=cuda; SLOW=1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
  CHECK="--device cuda:1 --reference-device cuda:0"
  XFER="--device cuda --model-dims llama-3.1-8b --tokens 8192 --repeats 3 --pd-transport cuda_ipc"
  NCCL="--tokens 8192 --repeats 5"
  TRACE="--device cuda --model /tmp/rand8b16 --block-tokens 512 --max-model-len 8192 \
    --requests 60 --rate 20 --rates 50,60,80 --rounds 2 --warmup 8 --ttft-slo 0.3 --tpot-slo 0.03 \
    --instance-args=--gpu-memory-utilization=0.42"
fi
T0=$(date +%s)
ALL=${ALL:-0}
if [ "$ALL" = 1 ]; then
  timeout $((60 * SLOW)) $PY -m moska.bench.pd_device_check $CHECK \
    --out "$OUT/pd_device_check.json" > /tmp/pd_device_check.log 2>&1 &
  CHECK_PID=$!
fi
if [ "$DEV" = cuda ]; then
  timeout 60 $PY -m moska.bench.random_checkpoint /tmp/rand8b16 --layers 16 --device cuda:0 \
    >> "$LOG" 2>&1; step checkpoint $?
fi
if [ "$ALL" = 1 ]; then
  wait $CHECK_PID; rc=$?; cat /tmp/pd_device_check.log >> "$LOG"; step device_check $rc
  timeout $((75 * SLOW)) $PY -m moska.bench.pd_transfer $XFER \
    --out "$OUT/pd_transfer_2gpu.json" >> "$LOG" 2>&1; step pd_transfer $?
fi
timeout $((45 * SLOW)) $PY -m moska.bench.nccl_p2p $NCCL --out "$OUT/nccl_p2p_2gpu.json" \
  >> "$LOG" 2>&1; step nccl_p2p $?
timeout $((150 * SLOW)) $PY -m moska.bench.trace $TRACE --out "$OUT/pd_trace_2gpu.json" \
  >> "$LOG" 2>&1; step trace $?
$PY - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
for f in ("pd_device_check", "pd_transfer_2gpu", "nccl_p2p_2gpu", "pd_trace_2gpu"):
    try:
        d = json.load(open(f"{o}/{f}.json"))
        print(f, json.dumps(d["summary"])[:1500])
        if "placement" in d:
            print("placement", json.dumps(d["placement"]))
    except Exception as e:  # noqa: BLE001
        print(f, "no summary:", e)
PY
grep -i "error\|traceback" "$LOG" | head -8 | cut -c1-300
