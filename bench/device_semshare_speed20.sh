#!/usr/bin/env bash
# #20.3 SemShareKV speed re-time on one H200 (kind nvidia-h200). Carry .whl and
# .models/moska-code-20m. 1) the reuse path stage by stage on a random 1B Llama at 5,120
# tokens (bench/semshare_path.py): clean totals, then a run with per-piece timers and a
# torch.profiler table; 2) the engine's TTFT with semantic reuse on vs off
# (bench/semshare_speed.py, the number).
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
P="python3 bench/semshare_path.py --device cuda --arch 1b --model .models/moska-code-20m"
timeout 150 $P --repeats 3 --out "$OUT/semshare_path_h200.json" > "$OUT/path.log" 2>&1
echo "path rc=$?"
timeout 120 $P --repeats 1 --substages --torch-profile "$OUT/semshare_path_h200_profile.txt" \
  --out "$OUT/semshare_path_h200_substages.json" > "$OUT/path_sub.log" 2>&1
echo "path substages rc=$?"
timeout 280 python3 bench/semshare_speed.py --tokenizer .models/moska-code-20m \
  --out "$OUT/semshare_speed_h200.json" > "$OUT/speed.log" 2>&1
echo "speed rc=$?"
for f in path path_sub speed; do echo "== $f"; tail -32 "$OUT/$f.log" | cut -c1-1200; done
head -45 "$OUT/semshare_path_h200_profile.txt" 2>/dev/null | cut -c1-200
