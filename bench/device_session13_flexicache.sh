#!/usr/bin/env bash
# Session 13 (one H200): #21 FlexiCache speed. The CUDA tests of tests/flexicache (store
# fetches, engine re-ranking reads, full-KV CUDA graph == eager), then the speed bench (full
# KV eager and from a CUDA graph vs FlexiCache; every step kind, re-rankings included, timed
# on the device alone), then the engine path's reads. Carry .whl and .models/moska-code-20m.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
TRITON_INTERPRET=0 timeout 50 python3 -m pytest -q -p no:cacheprovider -rs -m cuda tests/flexicache \
  > "$OUT/flexicache_cuda_tests.log" 2>&1; echo "cuda tests rc=$?"
timeout 140 python3 -m moska.bench.flexicache --mode speed \
  --out "$OUT/flexicache_speed_h200.json" > "$OUT/flexicache_speed.log" 2>&1; echo "speed rc=$?"
timeout 40 python3 -m moska.bench.flexicache_engine_reads --model .models/moska-code-20m \
  --requests 38 --prompt 1500 --tokens 64 --block-size 16 --num-kv-blocks 8192 \
  --flexicache k=16,recent=2,sink=1,threshold=0.75,r=8 --no-count \
  --out "$OUT/flexicache_engine_reads_h200_nocount.json" > "$OUT/flexicache_engine.log" 2>&1
echo "engine reads rc=$?"
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
for f in ("flexicache_speed_h200", "flexicache_engine_reads_h200_nocount"):
    try:
        d = json.load(open(f"{o}/{f}.json"))
        print(f, json.dumps(d.get("summary", {"partial rows": len(d.get("rows", []))}))[:2000])
        for r in d.get("rows", []):
            if "device_ms_by_kind" in r:
                print(" ", r["row"], r["batch"], "wall", r["step_ms_by_kind"], "device",
                      r["device_ms_by_kind"], "valid", r["device_probe_valid"], "tok/s", r["tokens_per_s"])
    except Exception as e:  # noqa: BLE001
        print(f, "no summary:", e)
PY
tail -4 "$OUT/flexicache_cuda_tests.log" | cut -c1-300
for f in flexicache_speed flexicache_engine; do tail -3 "$OUT/$f.log" | cut -c1-300; done
