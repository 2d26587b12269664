#!/usr/bin/env bash
# #20 SemShareKV at 8B dims through the engine, session 16 (one H200, kind nvidia-h200;
# < 150 s). Session 16 cut the plan's host time (LSH shares from one sort of the prompt's
# signatures instead of an unsorted binary search per reference; the prompt's ids through
# numpy; on CUDA the token matching queued on the shortlist's most voted reference while the
# host scores the shortlist: `SemanticReuse.speculate`), matching unchanged.
# 1) correctness: the CUDA tests of semshare (a blend graph's replay writes the eager blend's
# KV; the GPU reuse path vs the CPU's; a speculative plan equals a plain one on the GPU; the
# engine with both graphs serves a reused prompt right); 2) TTFT of 5,120-token
# near-duplicates (renamed, reordered, reworded; 3 documents x 3 seeds) through the engine on
# a random-weight Llama of 8B dims built in memory (reuse off vs on, r = 0.05, blend graphs,
# finish_in_blend; host time by stage: add(plan), blend, launch, record, steps) as in session
# 15; 3) the reuse path alone at 8B dims, in the time left. The loss of the workload is a
# CPU run (`semshare_quality.py --queries 0 --only-default --finish`, moska-code-20m, fp32):
# the matching is unchanged, so it is session 15's; re-run here on the CPU, not on the device.
# Run b (after call 1, whose reword median was 3.00x with the plan's host time unmoved at
# ~5 ms): 4 documents x 3 seeds (12 requests per kind), no `--no-finish-too` engine (measured
# twice already) but the same requests at recompute fractions 0.02 and 0.0 (`--also-fractions`;
# their loss on moska-code-20m: `semshare_quality_session16_fractions.json`, CPU), so the
# lead can see whether a lower default meets 3x within 2 % loss; the reuse path with
# `--substages --torch-profile` to split the plan (features, LSH lookup, matching; each
# synced, so the speculative overlap is not in them).
# Carry .whl and .models/moska-code-20m (its tokenizer). Prints one table.
# `bash bench/device_session16_semshare.sh --cpu-dry-run`: the same steps in CPU forms.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1; DRY=1
  TOK=${TOK:-../shared/models/moska-code-20m}
  TESTS="tests/semshare/test_graphs.py tests/semshare/test_finish_in_blend.py tests/semshare/test_plan_speed.py"; TT=120
  SARGS="--cpu-dry-run --also-fractions 0.02 0.0"
else
  PY=python3; export TRITON_INTERPRET=0; TOK=.models/moska-code-20m; DRY=""
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_semshare .whl/*.whl
  export PYTHONPATH=/tmp/site_semshare:$PWD
  TESTS="-m cuda tests/semshare/test_graphs.py tests/semshare/test_fast_path_cuda.py tests/semshare/test_finish_in_blend.py tests/semshare/test_plan_speed.py"; TT=40
  SARGS="--arch 8b --docs 4 --repeats 3 --also-fractions 0.02 0.0"
fi
# shellcheck disable=SC2086
timeout $TT $PY -m pytest -q -p no:cacheprovider -rs $TESTS > "$OUT/tests.log" 2>&1
echo "tests rc=$? ($(( $(date +%s) - T0 )) s)"
DG=""
if [ -z "$DRY" ]; then  # the engines as served (decode graphs on) when both graphs serve right
  timeout 25 $PY -m pytest -q -p no:cacheprovider -rs -m cuda \
    tests/semshare/test_graphs_engine_cuda.py > "$OUT/tests_engine.log" 2>&1 && DG="--decode-graphs"
  echo "engine graphs test: ${DG:-failed, the speed engines run eagerly} ($(( $(date +%s) - T0 )) s)"
fi
TS=$(( 140 - ($(date +%s) - T0) ))
# shellcheck disable=SC2086
timeout $TS $PY bench/semshare_speed.py --tokenizer "$TOK" $SARGS $DG \
  --out "$OUT/semshare_speed_8b_session16.json" > "$OUT/speed.log" 2>&1
echo "speed rc=$? ($(( $(date +%s) - T0 )) s)"
# the reuse path alone at 8B dims (as session 14's 3.31x: plan 3.66 + blend 36.89 ms vs 134.22
# plain), in the time left: the blend's boundary layer now runs attention + MLP on kept rows
TP=$(( 145 - ($(date +%s) - T0) ))
if [ -z "$DRY" ] && [ $TP -ge 30 ]; then
  timeout $TP $PY bench/semshare_path.py --model "$TOK" --device cuda --arch 8b --repeats 2 \
    --kinds rename reword --substages --torch-profile "$OUT/semshare_path_8b_profile_session16.txt" \
    --out "$OUT/semshare_path_8b_session16.json" > "$OUT/path_8b.log" 2>&1
  echo "path 8b rc=$? ($(( $(date +%s) - T0 )) s)"
fi
$PY - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
try:
    d = json.load(open(f"{o}/semshare_speed_8b_session16.json"))
except Exception as e:  # noqa: BLE001
    sys.exit(f"no speed result ({e})")
s = d["summary"]
print("model", d["model"], "graphs", d.get("graphs"), "enforce_eager",
      d["engine"].get("enforce_eager"), "r", d["semshare"]["recompute_fraction"],
      "speculate", d["semshare"].get("speculate"))
print(f"{'TTFT ms':8} {'plain':>7} {'reuse':>7} {'x':>5} {'nofin':>7} {'x':>5} {'reused':>7}  "
      "host ms of reuse: add(plan) blend launch record step | plain: step")
for k, r in s.items():
    if "speedup_median" not in r:
        continue
    h, f, nf = r["host_on_ms"], r["host_off_ms"], r.get("nofinish", {})
    print(f"{k:8} {r['ttft_off_ms']:>7} {r['ttft_on_ms']:>7} {r['speedup_median']:>5} "
          f"{nf.get('ttft_on_ms', '-'):>7} {nf.get('speedup_median', '-'):>5} "
          f"{r['reused_share']:>7}  {h.get('add', 0)}({h.get('plan', 0)}) {h.get('blend', 0)} "
          f"{h.get('launch', 0)} {h.get('record', 0)} {h.get('step', 0)} | {f.get('step', 0)}")
for k, r in s.items():  # the same requests at other recompute fractions
    fr = {f: (v["speedup_median"], v["reused_share"]) for f, v in r.items() if f[:1] == "r"
          and isinstance(v, dict) and "speedup_median" in v}
    if fr:
        print(f"{k:8} at other fractions (x, reused): {fr}")
if "original" in s:
    print("originals (stored as references):", s["original"])
try:
    p = json.load(open(f"{o}/semshare_path_8b_session16.json"))["summary"]
    ms = {k: p[k]["ms_median"] for k in ("plan", "blend_again", "full_prefill") if k in p}
    print("path 8b (ms):", ms, "x", round(ms["full_prefill"] / (ms["plan"] + ms["blend_again"]), 2))
    print("path 8b substages (ms, synced):", p.get("substages_ms_median"))
except Exception as e:  # noqa: BLE001
    print(f"path 8b: no result ({e})")
PY
for f in tests tests_engine; do [ -f "$OUT/$f.log" ] && tail -3 "$OUT/$f.log" | cut -c1-300; done
for f in speed path_8b; do [ -f "$OUT/$f.log" ] || continue; echo "== $f"; grep -i "warn\|error\|Traceback" "$OUT/$f.log" | head -4 | cut -c1-300; tail -2 "$OUT/$f.log" | cut -c1-300; done
echo "total $(( $(date +%s) - T0 )) s"
