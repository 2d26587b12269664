#!/usr/bin/env bash
# Session 14 (one H200): #21 FlexiCache throughput. Correctness first: the CUDA tests of
# tests/flexicache (plain steps replayed from a CUDA graph == eager steps, with re-rankings,
# page starts and recaptures: re-ranking in the step, deferred, and spread), then the speed
# bench, lean: full KV from a CUDA graph (B = 15) vs FlexiCache with its plain steps from a
# CUDA graph: B = 15 (memory at equal batch) and B = 38 at r = 16 with spread re-ranking
# (`--spread-rerank`: after each step one slice of ceil(32 / 16) = 2 layers re-ranks and
# fetches, so no step pays all 32 layers' re-ranking: flexicache/deferred.py; a page leaving
# the recent window is dropped only at its layer's re-ranking, `hold_unranked`), then B = 38
# at each of $ALSO (8i: spread at r = 8; 16d: deferred, every layer after one step in 16,
# the previous run's 1,647 tok/s row, as a baseline in the same run); every largest-batch
# row profiled over 16 steps.
# Carry .whl (and nothing else: the model is random). CPU form of the same bench:
#   .venv/bin/python -m moska.bench.flexicache --mode speed --cpu-dry-run --lean --graph \
#     --r 4 --spread-rerank --also-r 4d --profile-steps 4 --out /tmp/dry.json
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ALSO=${ALSO:-8i,16d}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
TRITON_INTERPRET=0 timeout 45 python3 -m pytest -q -p no:cacheprovider -rs -m cuda tests/flexicache \
  > "$OUT/flexicache_cuda_tests.log" 2>&1; echo "cuda tests rc=$?"
timeout 130 python3 -m moska.bench.flexicache --mode speed --lean --graph --r 16 --spread-rerank \
  --also-r "$ALSO" \
  --profile-steps 16 --out "$OUT/flexicache_speed_h200_session14.json" \
  > "$OUT/flexicache_speed.log" 2>&1; echo "speed rc=$?"
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
try:
    d = json.load(open(f"{o}/flexicache_speed_h200_session14.json"))
except Exception as e:  # noqa: BLE001
    sys.exit(f"no speed json: {e}")
s = d.get("summary")
keys = ("gpu_kv_saved_equal_batch", "batch_full", "batch_flexicache", "tokens_per_s_full",
        "tokens_per_s_device_bound_full", "by_rerank_interval")
print("summary", json.dumps({k: s[k] for k in keys}) if s else f"partial rows {len(d['rows'])}")
for r in d.get("rows", []):
    mode = "spread" if r.get("rerank_spread") else "deferred" if r.get("deferred_rerank") else ""
    print(" ", r["row"], r["batch"], r.get("r"), mode,
          "wall", r["step_ms_by_kind"], "device",
          r["device_ms_by_kind"], "tok/s", r["tokens_per_s"], "graph", r.get("graph_captures"),
          r.get("graph_replays"), "fetch ms/step", r.get("fetch_ms_per_step"))
    p = r.get("profile")
    if p:
        print("   profile", p["step_ms_by_kind"], "ranges", p["store_ranges"])
        for e in p["by_host_time"][:6] + p["by_device_time"][:6]:
            print("    ", e)
PY
tail -3 "$OUT/flexicache_cuda_tests.log" | cut -c1-300
tail -3 "$OUT/flexicache_speed.log" | cut -c1-300
