#!/usr/bin/env bash
# Session 16 (one H200, < 130 s): #21 loss of FlexiCache through the serving engine itself
# (moska/bench/flexicache_engine_quality.py): moska-code-20m (fp32), the 4 held-out windows
# of 2,048 tokens the store bench uses (networkx/sympy of the dev venv, tokenized into
# bench/flexicache_quality_windows.json: the device's versions differ), first 1,536 tokens
# prompt, the last 512 decoded one a step teacher-forced (a logits processor forces each
# window's next token and records its log-probability); --flexicache on (k=32, threshold
# 0.75, r=16, deferred, held pages, real hand-offs to the pinned host pool) against full KV
# in the same engine and a dense forward; GPU KV = blocks in use / full KV's, mean over the
# decode steps; pool_slot_use: resident pages / the pools' slots. Also (same run) the page
# pool as one slot space for all layers (slots=shared, sized by the mean layer instead of
# the worst), at threshold 0.75 and 0.6.
# Carry .whl and .models/moska-code-20m. CPU form: `... --cpu-dry-run`.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
J="$OUT/flexicache_engine_quality_h200_code20m_session16.json"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; ARGS="--cpu-dry-run --model ../shared/models/moska-code-20m"; TT=600
else
  PY=python3; export TRITON_INTERPRET=0; TT=110
  ARGS="--device cuda --model .models/moska-code-20m --windows-file bench/flexicache_quality_windows.json"
  ARGS="$ARGS --also k=32,slots=shared --also k=32,threshold=0.6,slots=shared"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_fc16q .whl/*.whl
  export PYTHONPATH=/tmp/site_fc16q:$PWD
fi
timeout $TT $PY -m moska.bench.flexicache_engine_quality $ARGS --out "$J" > "$OUT/flexicache_engine_quality.log" 2>&1
echo "engine quality rc=$? at $(( $(date +%s) - T0 )) s"
tail -4 "$OUT/flexicache_engine_quality.log" | cut -c1-400
$PY - "$J" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    sys.exit(f"no engine quality json: {e}")
s = d["engine_flexicache"]["flexi_stats"]
print("summary", json.dumps(d["summary"]))
for k, v in d.items():
    if k.startswith("also "):
        print(k, {x: (v["flexi_stats"] or {}).get(x) for x in ("offloads", "stable_fraction", "kept_fraction")})
print("stats", {k: s.get(k) for k in ("offloads", "extensions", "stable_fraction", "kept_fraction",
                                      "pool_blocks", "pool_slot_use", "fetched_pages")})
PY
