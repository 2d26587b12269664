#!/usr/bin/env bash
# Session 15 (one H200): #16.4 the serving benchmark at B = 256, where each run's time goes.
# Library decode steps replayed from CUDA graphs now run ahead of their tokens
# (asynchronous scheduling, routing reports copied from the graph's when queued); their
# CUDA test is device_session15_serve_check.sh, on the other GPU. The
# bench of bench/results/serve_h200.json's shape (127K-token library, the largest the
# prefix-cached baseline fits: Llama-3.1-8B's 131,072 positions; 256 requests x 256 own
# tokens x 64 generated, burst), every step recorded (moska/bench/serve_steps.py).
# Carry .whl only (the model is random). CPU form:
#   .venv/bin/python -m moska.bench.serve --cpu-dry-run --no-plot --step-log \
#     --sync-ab-steps 1 --profile-steps 1 --arrivals burst --variants routed_bf16 --out /tmp/d.json
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=/tmp/site_serve15  # its own: two scripts installing into one --target race
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH=$SITE:$PWD
# Call 2 (call 1, 21:00, gave bench/results/serve_h200_session15.json: full-batch decode
# 31.3 ms routed vs 541 ms baseline, 17.3x; library steps run ahead 31.3 ms vs synchronous
# 31.0 ms: reading a snapshot's routing with .cpu() waited for the next step; now copied to
# pinned host memory when queued): the same run again, routed bf16 and prefix-cached, with
# the sync A/B and 3 full-batch routed decode steps profiled (eager, left out of the
# figures; moska/bench/serve_profile.py). Its CUDA test is device_session15_serve_check.sh
# (on the other GPU: `bash bench/device_lead.sh "session15_serve:0 session15_serve_check:1"`).
J="$OUT/serve_h200_session15b.json"
timeout 140 python3 -m moska.bench.serve --requests 256 --unique-tokens 256 --max-tokens 64 \
  --gpu-memory-gib 120 --arrivals burst --variants routed_bf16 prefix_cached \
  --sync-ab-steps 8 --profile-steps 3 --step-log --no-plot --out "$J" > "$OUT/serve.log" 2>&1
echo "serve rc=$?"
grep -E "tok/s|failed|Error" "$OUT/serve.log" | cut -c1-400
python3 - "$J" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    sys.exit(f"no serve json: {e}")
s = d.get("summary", {})
print("complete", d.get("complete"), "library", d["shapes"]["library_tokens"],
      d["shapes"].get("library_bounds_tokens"))
for k, v in s.items():
    if k.startswith("burst_routed_bf16_vs") or k.startswith("burst_whole"):
        print(f"  {k} {v:.2f}")
print("  baseline", json.dumps(s.get("baseline_arithmetic", {}))[:300])
for r in d.get("rows", []):
    for run in r.get("runs", []):
        prof = run.get("profile")
        if prof:
            print("  profile ms/step", round(prof["total_ms_per_step"], 2), prof["rows"], "rows")
            for e in prof["top"][:12]:
                print(f"    {e['ms_per_step']:7.2f} ms x{e['calls_per_step']:.0f} {e['name'][:90]}")
for r in d.get("rows", []):
    for run in r.get("runs", []):
        p = run["phases"]
        keys = ("prefill_steps", "prefill_seconds", "decode_steps", "decode_seconds",
                "decode_output_tokens_per_s", "full_batch_decode_step_p50_s",
                "full_batch_schedule_p50_s", "full_batch_launch_p50_s", "full_batch_wait_p50_s",
                "full_batch_ran_ahead_share", "full_batch_by_library_mode")
        print(" ", r["variant"], run["output_tokens_per_s"], "ttft", run["ttft_p50_s"],
              run["ttft_p99_s"], json.dumps({k: p[k] for k in keys})[:600])
PY
