#!/usr/bin/env bash
# #18 session 16 on nvidia-h200-x2 (both GPUs): tensor parallelism beside shared-KV ranks
# (tensor_parallel_size=2, shared_kv_ranks=1: 3 processes; the TP pair over NCCL, a GPU
# each; the exchange over gloo, the shared rank sharing GPU 0) and its torchrun launch,
# then the existing shared-KV and TP distributed tests over NCCL where a GPU per rank allows
# (2-rank TP), CUDA tensors staged through gloo otherwise (the 4-rank exchange, 3 ranks).
# Three bounded pytest runs (per-test --timeout; a killed run loses no other's results):
#   1. new: test_tp_shared_kv_engine.py ([cpu] and [cuda]), test_torchrun_modes.py,
#      test_cli_distributed.py
#   2. exchange (55 s): test_shared_kv.py (incl. the TP-head cases; CUDA tensors, Triton;
#      its 4-rank fixture did not finish inside the first call's shared 65 s)
#   3. existing: test_tp_library.py and test_tp_three.py [cuda] (their [cpu] halves run in
#      CI), test_tp_library_routing.py, test_shared_kv_engine.py, test_torchrun_launch.py
# Carry .whl (no model folders: the tests build tiny checkpoints). Whole script < 150 s.
# Run: `bash bench/device_lead.sh session16_tp_shared` (x2). $OUT: new.log, exchange.log,
# existing.log, summary.json.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 MOSKA_DIST_TEARDOWN_S=8
export NCCL_DEBUG=WARN NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MOSKA_TEST_DEVICE=cuda MOSKA_TEST_BACKEND=nccl
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$SECONDS
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -2
D=tests/distributed
run() {  # run NAME LIMIT_S FILES...: one bounded pytest into $OUT/NAME.log
  local name=$1 limit=$2 log=$OUT/$1.log; shift 2
  if [ "$limit" -lt 15 ]; then echo "== $name not run: $limit s left"; return; fi
  timeout "$limit" python3 -m pytest -v -p no:cacheprovider -p no:randomly --timeout 45 \
    -o faulthandler_timeout=40 --durations=25 "$@" > "$log" 2>&1
  echo "== $name rc=$? ($((SECONDS - start)) s, limit $limit s)"
  grep -E "^(FAILED|ERROR) |Timeout \(|did not return" "$log" | head -8 | cut -c1-240
  tail -1 "$log" | cut -c1-240
}
run new 50 "$D/test_tp_shared_kv_engine.py" "$D/test_torchrun_modes.py" \
  "$D/test_cli_distributed.py"
run exchange 55 "$D/test_shared_kv.py"
left=$((${MAX_S:-145} - (SECONDS - start)))
run existing "$left" "$D/test_tp_library.py" "$D/test_tp_three.py" \
  "$D/test_tp_library_routing.py" "$D/test_shared_kv_engine.py" "$D/test_torchrun_launch.py" \
  -k "cuda or test_tp_library_routing or test_shared_kv_engine or test_torchrun_launch"
python3 - "$OUT" "$(git rev-parse HEAD 2> /dev/null)" <<'PY'
import collections, json, re, sys
out, commit = sys.argv[1], sys.argv[2]
per = collections.defaultdict(collections.Counter)
cuda = {}
for name in ("new", "exchange", "existing"):
    try:
        text = open(f"{out}/{name}.log", errors="replace").read()
    except OSError:
        continue
    for m in re.finditer(r"^(tests/\S+?\.py)::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", text, re.M):
        per[m.group(1)][m.group(3)] += 1
        if "cuda" in m.group(2):
            cuda[f"{m.group(1)}::{m.group(2)}"] = m.group(3)
total = collections.Counter()
for v in per.values():
    total.update(v)
summary = {"total": dict(total), "per_file": {k: dict(v) for k, v in sorted(per.items())},
           "cuda_params": cuda, "device_git_head": commit,
           "command": "bash bench/device_lead.sh session16_tp_shared (nvidia-h200-x2)"}
json.dump({"summary": summary}, open(f"{out}/summary.json", "w"), indent=1)
print("total", dict(total))
for k, v in sorted(per.items()):
    print(f"{k}: {dict(v)}")
print("cuda params:", collections.Counter(cuda.values()))
try:  # the new tests' slowest phases on a quiet 16-core box (the suite's budget)
    text = open(f"{out}/new.log", errors="replace").read()
    slow = re.findall(r"^(\d+\.\d+)s (setup|call|teardown)\s+(\S+)", text, re.M)
    print("new tests: %.1f s in phases >= 5 ms; slowest:" % sum(float(t) for t, _, _ in slow))
    for t, phase, test in slow[:6]:
        print(f"  {t} s {phase} {test.split('/')[-1][:90]}")
except OSError:
    pass
PY
echo "== session16_tp_shared done in $((SECONDS - start)) s"
