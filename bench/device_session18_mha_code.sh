#!/usr/bin/env bash
# #21 item 2, session 18 (one H200, kind nvidia-h200; ~260 s, at most ~270 s, agreed): KV-head
# compression measured on a small MHA *code* model trained for it (session 17's MHA retrieval
# models never learnt their task, so their conversions measured nothing).
# 1) train an MHA Llama code LM from scratch (moska.bench.train_code_lm: hidden 256, 6 layers,
#    4 heads = 4 KV heads, head dim 64, tied embeddings, ~7.2M params, 1,024-token windows of the
#    image's stdlib + site-packages .py files without networkx/sympy/scikit-learn, tokenizer of
#    moska-code-20m (.models/tok-code), bf16 autocast, AdamW, cosine lr, 3.0 min) into
#    $OUT/mha-code-lm (bf16 HF format, ~14 MB, with its train_log.json). With
#    .models/mha-code-lm carried (a previous call's model) it resumes from it.
# 2) bench/kv_heads_quality.py --mha-code-model: `moska convert kv-heads` to 2 and 1 KV heads
#    (50 % and 75 % removed), fitted (16K stdlib calibration tokens) and mean-pooled (the GQA
#    paper's baseline); per checkpoint: held-out networkx + sympy token loss (8 windows x 1,024
#    tokens each, fp32, moska), KV bytes/token, transformers-vs-moska logits (fp32), fitted
#    energy kept per layer -> $OUT/kv_heads_mha_code_h200_session18.json (after every row).
# Call 1 (04:46): trained to held-out loss 1.80 (227.6M tokens, 180 s); the measurement timed
#    out after the 50 % rows (fit's calibration runs on the CPU): the full table was measured on
#    CPU from the returned checkpoint (bench/results/kv_heads_mha_code_cpu_session18.json).
# Carry .whl-min and .models/tok-code (and .models/mha-code-lm to resume). Prints one table.
# `bash bench/device_session18_mha_code.sh --cpu-dry-run`: the same steps in toy CPU forms.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
MODEL=$OUT/mha-code-lm
RES=$OUT/kv_heads_mha_code_h200_session18.json
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
  TARGS="--cpu-dry-run"; MARGS="--cpu-dry-run"; RES=$OUT/kv_heads_mha_code_cpu_dry.json
  TLIM=120; TOTAL=200
else
  PY=python3; export TRITON_INTERPRET=0
  [ -d .whl-min ] && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site_mha18 .whl-min/*.whl
  export PYTHONPATH=/tmp/site_mha18:$PWD
  TARGS="--max-minutes ${MINUTES:-3.0} --batch 64 --context 1024 --lr 2e-3 --log-every 50"
  MARGS="--device cuda --windows 8"
  TLIM=240; TOTAL=268
fi
RESUME=""
[ -f .models/mha-code-lm/config.json ] && RESUME="--resume .models/mha-code-lm"
# shellcheck disable=SC2086
timeout $TLIM $PY -m moska.bench.train_code_lm --tokenizer .models/tok-code --out "$MODEL" \
  $TARGS $RESUME > "$OUT/train.log" 2>&1
echo "train rc=$? ($(( $(date +%s) - T0 )) s)"
grep -i "error\|Traceback" "$OUT/train.log" | head -3 | cut -c1-300
TM=$(( TOTAL - ($(date +%s) - T0) )); [ $TM -lt 30 ] && TM=30
# shellcheck disable=SC2086
timeout $TM $PY bench/kv_heads_quality.py --mha-code-model "$MODEL" $MARGS --out "$RES" \
  > "$OUT/measure.log" 2>&1
echo "measure rc=$? ($(( $(date +%s) - T0 )) s)"
grep -v "it/s\]\|seq/s\]\|layer/s\]" "$OUT/measure.log" | grep -i "error\|Traceback" | head -3 | cut -c1-300
$PY - "$RES" "$MODEL" <<'PY'
import json, sys
from pathlib import Path
res, model = sys.argv[1], Path(sys.argv[2])
size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
try:
    t = json.loads((model / "train_log.json").read_text())
    print("trained:", t["summary"], f"weights {size / 1e6:.1f} MB")
    print("corpus:", t["corpus"])
except Exception as e:  # noqa: BLE001
    print(f"no train log ({e})")
try:
    d = json.load(open(res))
except Exception as e:  # noqa: BLE001
    sys.exit(f"no result ({e})")
s = d["summary"]
print("env", {k: d["environment"].get(k) for k in ("torch", "transformers", "gpu", "git_commit")})
print(f"{'variant':<9} {'KV':>3} {'removed':>7} {'B/tok':>6} {'loss':>8} {'delta':>8} {'hf rel':>9}")
for r in d["rows"]:
    print(f"{r['variant']:<9} {r['kv_heads']:>3} {r['removed']:>7.2f} "
          f"{r['kv_bytes_per_token_bf16']:>6} {r['loss']:>8.4f} {r['delta_vs_original']:>+8.4f} "
          f"{r.get('transformers_logits_rel_err', '-'):>9}")
    if "energy_kept" in r:
        print("   energy kept K", r["energy_kept"]["k"], "V", r["energy_kept"]["v"])
print("summary", json.dumps({k: v for k, v in s.items() if k != "target"}))
PY
echo "total $(( $(date +%s) - T0 )) s"
