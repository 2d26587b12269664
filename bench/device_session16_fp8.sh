#!/usr/bin/env bash
# #16 FP8 grouped shared attention at B = 64 / 256 / 1,024, session 16 (one H200, kind
# nvidia-h200; < 150 s). 1) correctness: the CUDA cases of the FP8 kernel tests (the
# tensor-core program vs its own algorithm and vs the dequantized library, per-token and
# per-chunk scales, token-major V, q split); 2) one
# routed decode step's shared attention at Llama-3.1-8B dims (Hq 32, Hkv 8, D 128), a 1M-token
# library of 4,096-token chunks, top-8, uniform routing, as CUDA graphs in one run: bf16, FP8
# upcast (per-token scales, as libraries store them), FP8 tensor cores with token-major V
# (`fp8_mma_vt`: per-token scales loaded a block ahead, P.V accumulated in place, TOKEN_V2),
# the former program (`_v1`, A/B), per-chunk scales (`_chunk`, raw-max softmax; `_chunk_scaled`
# the former softmax, A/B) and q in two e4m3 terms (`fp8_mma_qsplit_vt`, the form that keeps
# top-1 >= 0.99), "block" scales (per 128 rows, `_block`: one scale per key block); tiles (--quick-tiles): fp8_mma_vt 4 + warp-specialized, persistent and
# 128 x 128, the others 2. First call (481c2dd, 23:29): B = 1,024 bf16 1.592, mma_vt 1.662,
# chunk 1.071 ms; upcast 2.7x slower than mma_vt at every B. Every variant, and every tile, is checked against the fp32 reference on
# 4 requests before it is timed (the JSON says; rc 1 if a variant is off, a tile off is dropped).
# B = 1,024 first: the JSON is rewritten after each batch, so a cut run keeps its rows.
# Carry .whl. `bash bench/device_session16_fp8.sh --cpu-dry-run`: the same steps on CPU.
# The 2M-token library at Llama-3.2-1B dims is not here: bench/results/big_library_1b.json
# (4716b88) served it GPU-resident through the engine; its build of 64 GiB of KV alone is
# longer than this script's budget.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
J="$OUT/fp8_attention_h200_session16.json"; JO=$J; LIM=142
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1
  TESTS="tests/kernels/test_shared_attention_fp8.py"; TT=120
  BARGS="--cpu-dry-run"; J="$OUT/fp8_attention_h200_session16_cpu_dry_run.json"; LIM=400
else
  PY=python3; export TRITON_INTERPRET=0
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_fp8 .whl/*.whl
  export PYTHONPATH=/tmp/site_fp8:$PWD
  TESTS="-m cuda tests/kernels/test_shared_attention_fp8.py"
  TT=40; BARGS="--batch 1024 256 64 --quick-tiles"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null | head -2
# shellcheck disable=SC2086
timeout $TT $PY -m pytest -q -p no:cacheprovider -rs $TESTS > "$OUT/tests.log" 2>&1
echo "tests rc=$? ($(( $(date +%s) - T0 )) s): $(tail -1 "$OUT/tests.log" | cut -c1-200)"
TS=$(( LIM - ($(date +%s) - T0) ))
# shellcheck disable=SC2086
timeout $TS $PY -m moska.bench.fp8_attention --routing uniform $BARGS \
  --variants fp8 fp8_mma_vt fp8_mma_vt_block fp8_mma_vt_v1 fp8_mma_vt_chunk \
  fp8_mma_vt_chunk_scaled fp8_mma_qsplit_vt --out "$JO" > "$OUT/bench.log" 2>&1
echo "bench rc=$? ($(( $(date +%s) - T0 )) s)"
grep -i "error\|Traceback" "$OUT/bench.log" | head -4 | cut -c1-300
$PY - "$J" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    sys.exit(f"no bench result ({e})")
s = d["summary"]
print("correct", s["correct"], "complete", s["complete"], "| read floor GB/s",
      round(d["ceilings"]["read_bytes_per_s"] / 1e9), "gemm TF/s",
      round(d["ceilings"]["gemm_flops_per_s"] / 1e12))
for r in d["rows"]:
    for n, e in r["correctness"].items():
        if not e.get("ok", True):
            print("NOT OK", r["batch"], n, {k: v for k, v in e.items() if k != "ok"})
for r in d["rows"]:
    for n in [k for k in r if k.endswith("_errors")]:
        print("ERR", r["batch"], n, [e[:160] for e in r[n]][:3])
    for n in [k for k in r if k.endswith("_ms_by_tile")]:
        print(r["batch"], n[:-11], {t.replace("'block_", "").replace("num_", ""): round(v, 3)
                                    for t, v in r[n].items()})
cols = ["bf16", "fp8", "fp8_mma_vt", "fp8_mma_vt_v1", "fp8_mma_vt_chunk",
        "fp8_mma_vt_chunk_scaled", "fp8_mma_qsplit_vt", "fp8_mma_vt_block"]
print("ms      B    bf16  upcast  mma_vt      v1   chunk chunk_s  qsplit   block"
      " | x bf16: vt v1 chunk qs block")
for e in s["by_batch"]:
    m = e["ms"]
    f = lambda n: f"{m[n]:7.3f}" if n in m else f"{'-':>7}"  # noqa: E731
    x = lambda n: f"{m['bf16'] / m[n]:.2f}" if n in m and "bf16" in m else "-"  # noqa: E731
    print(f"   {e['batch']:>5} " + " ".join(f(c) for c in cols) + " | "
          + " ".join(x(c) for c in ("fp8_mma_vt", "fp8_mma_vt_v1", "fp8_mma_vt_chunk",
                                    "fp8_mma_qsplit_vt", "fp8_mma_vt_block")))
PY
echo "total $(( $(date +%s) - T0 )) s"
