#!/usr/bin/env bash
# #20 item 2, session 17: boundary repair measured through the engine, on the device's CPU
# (16 quiet cores; the GPU is not used: the engine's CPU composed attention is a Python loop
# per selection, far too slow on the shared 2-core dev box). 1) correctness: the CPU tests of
# boundary repair (off == the plain build; repaired rows == transformers' joint encoding);
# 2) loss of composed requests over libraries built with repair off / m8 L2 / m32 L2 / m32 L8
# (bench/composition_repair_engine.py; the 8 windows of bench/composition_windows.json, the
# first 6 of which are composition_quality.json's), one (window, setting) per worker process (16), rows
# appended to a JSONL as they finish (a cut-short run still reports them).
# Carry .models/moska-code-20m (and .whl-min where the device's python lacks pydantic).
# `bash bench/device_session17_repair.sh --cpu-dry-run`: the same steps, small, here.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; MODEL=../shared/models/moska-code-20m
  ARGS="--cpu-dry-run --workers 2 --threads 1"; TT=120
else
  PY=python3; MODEL=.models/moska-code-20m; TT=30
  if [ -d .whl-min ]; then  # the engine needs pydantic only; the device's python may have it
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site_repair .whl-min/*.whl
  fi
  export PYTHONPATH=/tmp/site_repair:$PWD
  ARGS="--workers 16 --threads 1"
fi
export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # CPU only
timeout $TT $PY -m pytest -q -p no:cacheprovider -rs tests/library/test_boundary_repair.py \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$? ($(( $(date +%s) - T0 )) s): $(tail -1 "$OUT/tests.log")"
ROWS="$OUT/composition_repair_engine_session17.rows.jsonl"
TS=$(( 140 - ($(date +%s) - T0) ))
# shellcheck disable=SC2086
timeout $TS $PY bench/composition_repair_engine.py --model "$MODEL" $ARGS --rows-jsonl "$ROWS" \
  --out "$OUT/composition_repair_engine_session17.json" > "$OUT/engine.log" 2>&1
echo "engine bench rc=$? ($(( $(date +%s) - T0 )) s)"
if [ ! -s "$OUT/composition_repair_engine_session17.json" ] && [ -s "$ROWS" ]; then
  # shellcheck disable=SC2086
  $PY bench/composition_repair_engine.py $ARGS --from-rows "$ROWS" \
    --out "$OUT/composition_repair_engine_session17_partial.json" > /dev/null 2>&1
  echo "partial: $(wc -l < "$ROWS") rows summarized"
fi
$PY - "$OUT" <<'PY'
import glob, json, sys
files = sorted(glob.glob(f"{sys.argv[1]}/composition_repair_engine_session17*.json"))
if not files:
    sys.exit("no result")
s = json.load(open(files[0]))["summary"]
print(files[0].split("/")[-1], "samples", s["samples"], "default", s["default"])
for k, v in s["mean_loss"].items():
    print(f"  {k:24s} {v:.4f}  {s['vs_sequential_pct'][k]:+.2f} % vs sequential")
for k, v in s["repair_vs_off_pct"].items():
    print(f"  {k}: vs off all {v['all']:+.3f} %, top25 {v['top25']:+.3f} %,",
          f"better on {v['packages_better_top25']}/{s['samples']} (top25)")
print("  engine vs plain-PyTorch composition, max |d loss|:", s["engine_vs_reference_max_abs"])
PY
