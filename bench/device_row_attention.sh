#!/usr/bin/env bash
# #20 SemShareKV row attention in a Triton kernel (one H200): its CUDA test, the kernel vs
# the masked SDPA path alone (bench/row_attention.py), then the reuse path stage by stage
# and the TTFT re-time. Carry .whl and .models/moska-code-20m.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
TRITON_INTERPRET=0 timeout 90 python3 -m pytest -q -p no:cacheprovider -rs -m cuda \
  tests/kernels/test_row_attention.py > "$OUT/row_attention_tests.log" 2>&1; echo "cuda test rc=$?"
timeout 90 python3 bench/row_attention.py --out "$OUT/row_attention_h200.json" \
  > "$OUT/row_attention.log" 2>&1; echo "row_attention rc=$?"
timeout 150 python3 bench/semshare_path.py --device cuda --arch 1b --model .models/moska-code-20m \
  --repeats 3 --substages --out "$OUT/semshare_path_h200_substages.json" > "$OUT/semshare_path.log" 2>&1
echo "semshare_path rc=$?"
timeout 200 python3 bench/semshare_speed.py --tokenizer .models/moska-code-20m \
  --out "$OUT/semshare_speed_h200.json" > "$OUT/semshare_speed.log" 2>&1; echo "semshare_speed rc=$?"
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
for f in ("row_attention_h200", "semshare_path_h200_substages", "semshare_speed_h200"):
    try:
        print(f, json.dumps(json.load(open(f"{o}/{f}.json"))["summary"])[:1600])
    except Exception as e:  # noqa: BLE001
        print(f, "no summary:", e)
PY
tail -4 "$OUT/row_attention_tests.log" | cut -c1-300
for f in row_attention semshare_path semshare_speed; do tail -3 "$OUT/$f.log" | cut -c1-300; done
