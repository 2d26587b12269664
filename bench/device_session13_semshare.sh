#!/usr/bin/env bash
# #20 SemShareKV speed, session 13 (one H200, kind nvidia-h200; < 240 s). Carry .whl and
# .models/moska-code-20m. 1) the SemShareKV CUDA tests (fp16 plan vs the CPU's, GPU blend
# vs the CPU blend with <= 2 host syncs, the row attention kernel); 2) the reuse path stage
# by stage on a random 1B Llama at 5,120 tokens (bench/semshare_path.py); 3) the
# engine's TTFT with reuse on vs off (bench/semshare_speed.py, the issue's number;
# 2 documents x 3 kinds x 2 seeds), at the default recompute fraction 0.15 and at 0.05
# (within 2% loss on the CPU quality bench too). Prints one table.
# Session 13d: the blend's row count is padded to a row bucket and every bucket's matmul
# shapes are warmed at start (the 13c profile: each new row count cost ~3 ms of cuBLAS host
# time per shape); the path run is unsynced (no --substages) and times each blend twice
# (blend_again: every shape seen) to show what a cold shape costs.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
TRITON_INTERPRET=0 timeout 45 python3 -m pytest -q -p no:cacheprovider -rs -m cuda \
  tests/semshare tests/kernels/test_row_attention.py > "$OUT/tests.log" 2>&1
echo "cuda tests rc=$? ($(( $(date +%s) - T0 )) s)"
# stage totals (plan, blend, the same blend again, plain prefill; synced at stage ends only)
# and a torch.profiler table of one plan + blend
timeout 55 python3 bench/semshare_path.py --device cuda --arch 1b --model .models/moska-code-20m \
  --repeats 3 --torch-profile "$OUT/semshare_path_h200_profile_session13.txt" \
  --out "$OUT/semshare_path_h200_session13.json" > "$OUT/path.log" 2>&1
echo "path rc=$? ($(( $(date +%s) - T0 )) s)"
# control in the same run: no row buckets (a new row count, so new matmul shapes, per request)
timeout 30 python3 bench/semshare_path.py --device cuda --arch 1b --model .models/moska-code-20m \
  --repeats 2 --kinds rename --skip-baseline --row-granule 1 \
  --out "$OUT/semshare_path_h200_session13_granule1.json" > "$OUT/path_granule1.log" 2>&1
echo "path granule 1 rc=$? ($(( $(date +%s) - T0 )) s)"
timeout 95 python3 bench/semshare_speed.py --tokenizer .models/moska-code-20m --docs 2 \
  --repeats 2 --also-fractions 0.05 --out "$OUT/semshare_speed_h200_session13.json" > "$OUT/speed.log" 2>&1
echo "speed rc=$? ($(( $(date +%s) - T0 )) s)"
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
def load(name):
    try:
        return json.load(open(f"{o}/{name}.json"))["summary"]
    except Exception as e:  # noqa: BLE001
        print(f"{name}: no summary ({e})")
        return None
path = sub = load("semshare_path_h200_session13")
if path:
    print(f"{'path (5,120 tokens, 1B; synced)':32} {'median ms':>10} {'first ms':>9} {'syncs':>6}")
    for k in ("plan", "blend", "blend_again", "full_prefill"):
        if k in path:
            r = path[k]
            print(f"{k:32} {r['ms_median']:>10} {r['first_ms_max']:>9} {r['syncs_max']:>6}")
    if "plan" in path and "full_prefill" in path:
        reuse = path["plan"]["ms_median"] + path["blend"]["ms_median"]
        print(f"{'plan + blend vs full':32} {reuse:>10.2f}  speedup {path['full_prefill']['ms_median'] / reuse:.2f}x")
    print("reused share", path.get("reused_share"), "warm_up", path.get("warm_up"),
          "row counts", path.get("row_counts"))
if sub and sub.get("substages_ms_median"):
    print("substages (synced each, ms):", json.dumps(sub.get("substages_ms_median")))
g1 = load("semshare_path_h200_session13_granule1")
if g1:
    print("control, no row buckets (rename): blend", g1["blend"]["ms_median"], "ms, again",
          g1["blend_again"]["ms_median"], "ms; row counts", g1.get("row_counts"))
speed = load("semshare_speed_h200_session13")
if speed:
    print(f"{'TTFT kind':12} {'off ms':>8} {'on ms':>8} {'speedup':>8} {'reused':>7}   r=0.05: on ms, speedup, reused")
    for k, r in speed.items():
        if "speedup_median" in r:
            q = r.get("r0.05", {})
            print(f"{k:12} {r['ttft_off_ms']:>8} {r['ttft_on_ms']:>8} {r['speedup_median']:>8} {r['reused_share']:>7}   {q.get('ttft_on_ms')} {q.get('speedup_median')} {q.get('reused_share')}")
PY
tail -5 "$OUT/tests.log" | cut -c1-300
for f in path path_granule1 speed; do echo "== $f"; tail -3 "$OUT/$f.log" | cut -c1-400; done
head -30 "$OUT/semshare_path_h200_profile_session13.txt" 2>/dev/null | cut -c1-60,100-200
echo "total $(( $(date +%s) - T0 )) s"
