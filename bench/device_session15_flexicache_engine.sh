#!/usr/bin/env bash
# Session 15 (one H200): #21 FlexiCache in the serving engine (`--flexicache`), with its new
# default: deferred re-ranking at r = 16, pages held until their next re-ranking. Correctness
# first: the engine on CUDA (re-ranking steps read nothing back, tokens equal the modeled
# lists) and the CPU test that the engine decodes the bench store's tokens; then the engine
# speed run (moska/bench/flexicache_engine_speed.py): random Llama-3.1-8B-shaped model,
# context 4096, 75 % of (layer, KV head) forced stable as in the store bench; rows
# deferred:38 (FlexiCache at the store bench's largest batch), full:15 (full KV from the
# engine's CUDA graphs), deferred-eager:38 (every FlexiCache step eager), deferred:15 (GPU KV
# at equal batch); tokens/s over 32 timed engine.step() calls after 34 warm-up steps
# (hand-offs done). Since 20:40 UTC: every request re-ranks at the same steps (clock % r),
# plain steps keep the lists (flexicache/plain_lists.py) and replay from CUDA graphs
# (flexicache/engine_graphs.py), fetches of all requests in one gather per layer.
# Carry .whl only (the model is random). CPU form:
#   .venv/bin/python -m moska.bench.flexicache_engine_speed --cpu-dry-run --out /tmp/d.json
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROWS=${ROWS:-deferred:38,full:15,deferred-eager:38,deferred:15}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
TRITON_INTERPRET=0 timeout 40 python3 -m pytest -q -p no:cacheprovider -rs \
  tests/flexicache/test_engine_rerank_reads.py::test_engine_rerank_reads_nothing_back_on_cuda \
  tests/flexicache/test_engine_plain_steps.py \
  tests/flexicache/test_engine_deferred.py > "$OUT/flexicache_engine_tests.log" 2>&1
echo "tests rc=$?"
timeout 100 python3 -m moska.bench.flexicache_engine_speed --rows "$ROWS" \
  --out "$OUT/flexicache_engine_speed_h200_session15.json" > "$OUT/flexicache_engine_speed.log" 2>&1
echo "engine speed rc=$?"
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
try:
    d = json.load(open(f"{o}/flexicache_engine_speed_h200_session15.json"))
except Exception as e:  # noqa: BLE001
    sys.exit(f"no engine speed json: {e}")
print("summary", json.dumps(d.get("summary")))
for r in d["rows"]:
    s = r.get("flexi_stats", {})
    print(" ", r["row"], r["batch"], "tok/s %.0f" % r["tokens_per_s"], "step ms %.1f" % r["step_ms"],
          "graphs", r["cuda_graphs"], r.get("plain_graphs"), "kv", r["gpu_kv_blocks_used"], "/", r["full_kv_blocks"],
          "prefill+warmup s %.1f" % r["prefill_and_warmup_s"], "rerank/other step ms",
          r.get("rerank_step_ms"), r.get("other_step_ms_median"),
          {k: s.get(k) for k in ("kept_fraction", "offloads", "released_blocks", "fetched_pages",
                                 "steps", "plain_steps")})
PY
tail -3 "$OUT/flexicache_engine_tests.log" | cut -c1-300
tail -3 "$OUT/flexicache_engine_speed.log" | cut -c1-300
