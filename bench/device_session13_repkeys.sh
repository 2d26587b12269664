#!/usr/bin/env bash
# Session 13, #17 point 3 (one H200, < 200 s): a router whose cost does not scale with every
# key. Representative keys (moska/routing/representatives.py): key-max per KV head over m
# low-rank keys per chunk (norm16 / norm32: the 16 / 32 largest-norm keys; kmeans32, in the
# fidelity only: 32 k-means centroids) instead of every key.
# 1) correctness on the GPU: the Triton key-max kernel on the representatives against the
#    loop reference (fp16 / bf16 pools); 2) `moska.bench.kernels --routers-only` at B = 64 /
#    256 / 1,024 (8B dims, 256 chunks of 4,096, top-8, rank 32): the grouped step alone and
#    with mean, two-stage, the default (keymax_kv_r32) and each rep_* router, each against its
#    floor (which counts the router's own reads and FLOPs); 3) the retrieval fidelity of the
#    rep routers against the default (`--device cuda`, 64 questions, prefix, 256-token chunks).
# Carry .whl and .models/retrieval-4k. Prints one table.
# `bash bench/device_session13_repkeys.sh --cpu-dry-run`: the same steps in CPU forms.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
POLS="default rep-norm16 rep-norm32 rep-kmeans32"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1 DEVICE=cpu
  MODEL=${MODEL:-/work/notes/models/retrieval-4k}
  KARGS="--cpu-dry-run"; KJSON=$OUT/kernels_cpu_dry_run.json
  FARGS="--cpu-dry-run --device cpu --dtype float32"; TK=300; TF=300
else
  PY=python3; export DEVICE=cuda MODEL=.models/retrieval-4k
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  KARGS="--routers-only --router-ranks 32 --batch 64,256,1024"; KJSON=$OUT/kernels_routers.json
  FARGS="--device cuda --dtype bfloat16 --questions 64"; TK=90; TF=80
fi
timeout 20 $PY - > "$OUT/repkeys_correctness.log" 2>&1 <<'PY'
import json, os, torch
from moska.kernels.router import build_routing_index
from moska.kernels.router_dense import keymax_dense_scores
from moska.routing.representatives import RepSpec, representatives_for, score_representatives_ref
dev = os.environ["DEVICE"]
out = {}
for dtype in ((torch.float16, torch.bfloat16) if dev == "cuda" else (torch.float32,)):
    for kind in ("page", "norm", "kmeans"):
        torch.manual_seed(0)
        offs = torch.arange(0, 8 * 256 + 1, 256, dtype=torch.int32, device=dev)
        k = (2 * torch.randn(8 * 256, 2, 64, device=dev)).to(dtype)
        index = build_routing_index(k, offs, rank=16)
        q = (2 * torch.randn(33, 8, 64, device=dev)).to(dtype)
        spec = RepSpec(kind, 16)
        reps = representatives_for(index, spec)
        got = keymax_dense_scores(q, reps.basis, reps.lowrank_keys, reps.chunk_offsets, block_n=16)
        ref = score_representatives_ref(q.cpu(), index._replace(
            lowrank_keys=index.lowrank_keys.cpu(), chunk_offsets=offs.cpu(),
            basis=index.basis.cpu()), spec)
        out[f"{kind}_{dtype}"] = float((got.cpu() - ref).norm() / ref.norm())
print(json.dumps(out))
bad = {k: v for k, v in out.items() if not v < 1e-2}
raise SystemExit(f"rep scores off: {bad}" if bad else 0)
PY
echo "rep-key correctness rc=$? $(tail -1 "$OUT/repkeys_correctness.log" | cut -c1-300)"
timeout $TK $PY -m moska.bench.kernels $KARGS --out "$OUT" > "$OUT/kernels_routers.log" 2>&1
echo "kernels routers rc=$?"
timeout $TF $PY -m moska.bench.fidelity --retrieval-model "$MODEL" $FARGS --modes prefix \
  --chunk-sizes 256 --study --policies $POLS --out "$OUT/fidelity_retrieval_repkeys.json" \
  > "$OUT/fidelity.log" 2>&1; echo "fidelity rc=$?"
grep -E "FLOOR CHECK|Error|error" "$OUT/kernels_routers.log" | tail -5 | cut -c1-400
$PY - "$KJSON" "$OUT" <<'PY'
import json, sys
kjson, out = sys.argv[1], sys.argv[2]
f = lambda x: "-" if x is None else f"{x:.3f}"
try:
    rows = json.load(open(kjson))["grouped"]
    print(f"{'B':>5} {'router':<18} {'step ms':>8} {'alone ms':>8} {'floor ms':>8} {'frac':>6}")
    for r in (r for r in rows if r.get("routing") == "uniform"):
        print(f"{r['B']:>5} {'(none)':<18} {f(r['ours_ms']):>8} {'-':>8} {f(r['floor_ms']):>8} "
              f"{f(r['roofline_fraction']):>6}")
        pre = "roofline_fraction_with_router_"
        for n in [k[len(pre):] for k in r if k.startswith(pre)]:
            print(f"{r['B']:>5} {n:<18} {f(r.get(f'ours_with_router_{n}_ms')):>8} "
                  f"{f(r.get(f'router_{n}_alone_graph_ms')):>8} "
                  f"{f(r.get(f'floor_with_router_{n}_ms')):>8} {f(r.get(pre + n)):>6}")
        for k in (k for k in r if k.startswith("router_") and k.endswith("_err")):
            print(f"{r['B']:>5} {k:<18} {r[k][-200:]}")
except Exception as e:  # noqa: BLE001
    print("kernels: no table:", e)
try:
    d = json.load(open(f"{out}/fidelity_retrieval_repkeys.json"))["retrieval"]
    print("retrieval fidelity: dense", d.get("dense_accuracy"), d.get("reason", ""))
    for p, by_f in d.get("summary", {}).items():
        print(f"  {p:<14}", {fr: v["all"] for fr, v in by_f.items()})
except Exception as e:  # noqa: BLE001
    print("fidelity: no table:", e)
PY
