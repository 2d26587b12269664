#!/usr/bin/env bash
# #20 item 4, SemShareKV steady state TIMED (session 17; one H200, kind nvidia-h200;
# < 120 s): 1,000 novel near-duplicate queries (a random rename / reorder / reword variant,
# fresh seed, of one of 12 pool documents; 1,024-token prompts) through the reuse engine on a
# random-weight Llama of 8B dims in bf16, its store bound at 3/4 of the pool's references
# (eviction happens); the plain engine on every 2nd query, interleaved in the same run.
# TTFT per window of 100 queries, speedup per window = plain median / reuse median, and the
# lowest window from window 1 on over window 1 (warm). bench/semshare_steady.py.
# Carry .whl and .models/moska-code-20m (its tokenizer files only). Prints one table.
# `bash bench/device_session17_steady.sh --cpu-dry-run`: the same in CPU form.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1
  TOK=${TOK:-../shared/models/moska-code-20m}; SARGS="--cpu-dry-run"
else
  PY=python3; export TRITON_INTERPRET=0; TOK=.models/moska-code-20m
  SARGS="--arch 8b --prompt 1024 --pool 12 --queries 1000 --store-frac 0.75 --baseline-every 2"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_steady .whl/*.whl
  export PYTHONPATH=/tmp/site_steady:$PWD
fi
export MOSKA_GIT_COMMIT=${MOSKA_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
J="$OUT/semshare_steady_8b_h200_session17.json"
TS=$(( 112 - ($(date +%s) - T0) ))
# shellcheck disable=SC2086
timeout $TS $PY bench/semshare_steady.py --tokenizer "$TOK" $SARGS --out "$J" > "$OUT/steady.log" 2>&1
echo "steady rc=$? ($(( $(date +%s) - T0 )) s)"
grep -i "warn\|error\|Traceback" "$OUT/steady.log" | head -4 | cut -c1-300
$PY - "$J" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    sys.exit(f"no result ({e})")
s = d["summary"]
print("model", d["model"], d["dtype"], "prompt", s["prompt_tokens"], "pool", s["pool"],
      "store refs", s["store_capacity_refs"], "queries", s["queries"], "distinct",
      s["distinct_queries"], "evictions", s["evictions"], "gen s", s["query_gen_s"],
      "loop s", s["timed_loop_s"], "wall s", s["wall_s"])
print(f"{'window':>9} {'on ms':>7} {'off ms':>7} {'x':>6} {'x pair':>6} {'miss':>4} {'reused':>6} {'store':>5} {'evict':>5}")
for w in d["windows"]:
    print(f"{w['queries'][0]:>4}-{w['queries'][1]:<4} {w['on_median_ms']:>7} {w['off_median_ms']:>7} "
          f"{w['speedup']:>6} {w['speedup_paired_median']:>6} {w['misses']:>4} {w['reused_share']:>6} "
          f"{w['store_entries']!s:>5} {w['evictions_so_far']!s:>5}")
print(f"warm (window {s['warm_window']}) {s['warm_speedup']}x, min {s['min_window_speedup']}x, "
      f"min/warm {s['min_over_warm']} (>= 0.8: {s['met_80pct']})")
PY
tail -1 "$OUT/steady.log" | cut -c1-200
echo "total $(( $(date +%s) - T0 )) s"
