#!/usr/bin/env bash
# Session 15, #17 audit (one H200, < 300 s: LIMIT=300): the two retrieval rows the issue's table still
# lacks on the GPU, one after the other (each engine takes the GPU's memory budget):
# 1) 64-token chunks (64 per 4,096-token context), bf16, 96 questions: the default and the
#    old router with each scorer (key-max, two-stage, mean, bound, oracle) at 12.5 / 25 /
#    50 % kept: the issue's left-hand column, which no run has measured on this model;
# 2) the full-rank routing index (--routing-rank 64 = head_dim): the issue saw a full-rank
#    index collapse accuracy (0-35 of 256); 256-token chunks, the default and per-request
#    key-max, 32 questions, against the rank-16 rows of fidelity_retrieval_h200_bfloat16_triton.json.
# Correctness first: the routing CUDA tests (key-max kernel vs its reference at every rank).
# Carry .whl and .models/retrieval-4k (a copy of /work/notes/models/retrieval-4k).
# CPU form (a model trained in the run, refused by nothing: --min-dense 0, toy sizes):
#   bash bench/device_session15_fidelity17.sh --cpu-dry-run
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=.models/retrieval-4k
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
  MODEL=$OUT/ret-dry
  timeout 120 $PY -m moska.bench.train_retrieval --cpu-dry-run --steps 2 --out "$MODEL" \
    > "$OUT/train.log" 2>&1; echo "train (dry) rc=$?"
  COMMON="--cpu-dry-run --min-dense 0 --context-tokens 96 --questions 2"
  C64="$COMMON --policies default legacy-keymax"
  R64="$COMMON --routing-rank 64 --policies default legacy-keymax"; TC=200; TR=200
else
  PY=python3
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  TRITON_INTERPRET=0 timeout 20 $PY -m pytest -q -p no:cacheprovider -rs -m cuda \
    tests/kernels/test_router_dense.py > "$OUT/router_tests.log" 2>&1
  echo "router cuda tests rc=$?"
  COMMON="--device cuda --dtype bfloat16 --attention triton --modes prefix"
  C64="$COMMON --chunk-sizes 64 --questions 96 --policies default legacy-keymax \
    legacy-two_stage legacy-mean legacy-bound legacy-oracle"
  R64="$COMMON --chunk-sizes 256 --questions 32 --routing-rank 64 --policies default legacy-keymax"
  TC=230; TR=45
fi
# shellcheck disable=SC2086
timeout $TC $PY -m moska.bench.fidelity --retrieval-model "$MODEL" $C64 \
  --out "$OUT/fidelity_retrieval_h200_c64_session15.json" > "$OUT/c64.log" 2>&1
echo "64-token chunks rc=$?"
# shellcheck disable=SC2086
timeout $TR $PY -m moska.bench.fidelity --retrieval-model "$MODEL" $R64 \
  --out "$OUT/fidelity_retrieval_h200_rank64_session15.json" > "$OUT/rank64.log" 2>&1
echo "full rank rc=$?"
tail -2 "$OUT/router_tests.log" 2>/dev/null | cut -c1-300
$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for name in ("c64", "rank64"):
    path = f"{out}/fidelity_retrieval_h200_{name}_session15.json"
    try:
        r = json.load(open(path))["retrieval"]
    except Exception as e:  # noqa: BLE001
        print(name, "no JSON:", e)
        continue
    print(f"== {name}: dense {r['dense_accuracy']}, refused {r['refused']}")
    for res in r.get("results", []):
        for row in res["rows"]:
            print(f"  {res['chunk_size']:>4} {row['policy']:<18} k={row['k']:>2} "
                  f"({row['fraction']}): {row['value']:.4f} cov {row['coverage']} n {row['n']}")
PY
for f in c64 rank64; do tail -2 "$OUT/$f.log" | cut -c1-300; done
