#!/usr/bin/env bash
# #18 session 15 on nvidia-h200-x2: the whole distributed suite over NCCL (2 GPUs; the
# 3-4-rank cases stage through gloo, see tests/distributed/conftest.py), after the ordered,
# bounded teardown (moska/distributed/teardown.py) let the TP tests finish on NCCL. One
# bounded pytest (-q, per-test --timeout), then the per-file counts. Carry .whl; < 280 s.
# Run: `bash bench/device_lead.sh session15_dist_suite` (x2). $OUT: dist_suite.log,
# summary.json.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 MOSKA_TP_CUDA_GRAPHS=1
export MOSKA_DIST_TEARDOWN_S=8 NCCL_DEBUG=WARN
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$SECONDS
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
MOSKA_TEST_DEVICE=cuda MOSKA_TEST_BACKEND=nccl timeout "${MAX_S:-270}" python3 -m pytest -v \
  -p no:cacheprovider -p no:randomly tests/distributed --timeout 45 \
  -o faulthandler_timeout=40 > "$OUT/dist_suite.log" 2>&1
echo "== distributed suite rc=$? ($((SECONDS - start)) s)"
grep -E "^(FAILED|ERROR) |Timeout \(|did not return" "$OUT/dist_suite.log" | head -20 | cut -c1-240
tail -3 "$OUT/dist_suite.log" | cut -c1-300
python3 - "$OUT" <<'PY'
import collections, json, re, sys
out = sys.argv[1]
per = collections.defaultdict(collections.Counter)
for line in open(f"{out}/dist_suite.log", errors="replace"):
    m = re.match(r"(tests/\S+?\.py)::\S+ (PASSED|FAILED|ERROR|SKIPPED)", line)
    if m:
        per[m.group(1)][m.group(2)] += 1
summary = {k: dict(v) for k, v in sorted(per.items())}
total = collections.Counter()
for v in per.values():
    total.update(v)
json.dump({"summary": {"total": dict(total), "per_file": summary}}, open(f"{out}/summary.json", "w"), indent=1)
print("total", dict(total))
for k, v in summary.items():
    if set(v) - {"PASSED", "SKIPPED"}:
        print(f"{k}: {v}")
PY
