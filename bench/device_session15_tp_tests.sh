#!/usr/bin/env bash
# #18 session 15 on nvidia-h200-x2 (2 GPUs, NCCL): the TP tests whose bodies passed in
# session 15's first run but whose shutdown hung (rank 0 in destroy_process_group after
# joining a worker that sat in its own: NCCL's destroy waits for its peers and for every
# CUDA graph holding a captured collective). Now every rank releases its graphs, meets the
# others on the gloo control group and destroys with a deadline (abort after it):
# moska/distributed/teardown.py. Runs, each bounded by `timeout` (a killed run loses no
# other run's results):
#   1. test_tp_graphs.py's NCCL test (spawned and forkserver workers), with the teardown's
#      steps logged per rank (MOSKA_DIST_STUCK_DUMP_S) and ProcessGroupNCCL's own shutdown
#      steps (TORCH_CPP_LOG_LEVEL=INFO: flush / watchdog joined / destroy complete)
#   2. test_tp_library.py's cuda half (module-scoped 2-rank set over NCCL)
#   3. the NCCL distributed suite (the other files) for what time is left, per test
#      bounded (--timeout), results printed per file
# Carry .whl. Whole script < 150 s. $OUT: tp_graphs.log, tp_library.log, dist_suite.log,
# summary.json.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export MOSKA_TP_CUDA_GRAPHS=1 MOSKA_DIST_STUCK_DUMP_S=30 MOSKA_DIST_TEARDOWN_S=8
export NCCL_DEBUG=WARN NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$SECONDS
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
PYTEST=(python3 -m pytest -v -s -p no:cacheprovider -p no:randomly -o log_cli=true
  -o log_cli_level=WARNING)
run() {  # run NAME LIMIT_S PYTEST_ARGS...: one bounded pytest into $OUT/NAME.log
  local name=$1 limit=$2 log=$OUT/$1.log; shift 2
  if [ "$limit" -lt 15 ]; then echo "== $name not run: $limit s left"; return; fi
  timeout "$limit" "${PYTEST[@]}" "$@" > "$log" 2>&1
  echo "== $name rc=$? ($((SECONDS - start)) s, limit $limit s)"
  grep -E "PASSED|FAILED|ERROR|Timeout|RankFailed|Error:|^E  " "$log" | grep -v "_pytest\|pluggy" \
    | awk '!seen[$0]++' | head -14 | cut -c1-240
  # each rank's teardown steps (teardown.py) and ProcessGroupNCCL's own (C++ INFO log)
  grep -E "teardown:|did not return|Destroy complete|Watchdog joined|flush|NCCL WARN" "$log" \
    | awk '!seen[$0]++' | tail -10 | cut -c1-240
}
G=tests/distributed/test_tp_graphs.py
TORCH_CPP_LOG_LEVEL=INFO run tp_graphs 60 "$G" -k nccl --timeout 45 -o faulthandler_timeout=40
run tp_library 40 tests/distributed/test_tp_library.py -k cuda --timeout 30 \
  -o faulthandler_timeout=25
left=$((${MAX_S:-146} - (SECONDS - start)))  # MAX_S=0: no suite (this machine's check)
if [ "$left" -ge 15 ]; then
  MOSKA_TEST_DEVICE=cuda MOSKA_TEST_BACKEND=nccl timeout "$left" python3 -m pytest -v \
    -p no:cacheprovider -p no:randomly tests/distributed --ignore "$G" \
    --ignore tests/distributed/test_tp_library.py --timeout 30 -o faulthandler_timeout=25 \
    > "$OUT/dist_suite.log" 2>&1
  echo "== distributed suite rc=$? ($((SECONDS - start)) s, limit $left s)"
else
  echo "== distributed suite not run: $left s left"
fi
python3 - "$OUT" <<'PY'
import collections, json, re, sys
out = sys.argv[1]
per = collections.defaultdict(collections.Counter)
for name in ("tp_graphs", "tp_library", "dist_suite"):
    try:
        text = open(f"{out}/{name}.log", errors="replace").read()
    except OSError:
        continue
    f = None  # the file of the test last named (-s / live logs split its line)
    for line in text.splitlines():
        if re.match(r"(PASSED|FAILED|ERROR) tests/", line):
            continue  # the short summary repeats a result
        m = re.match(r"(tests/\S+?\.py)::", line)
        f = m.group(1) if m else f
        word = r"(PASSED|FAILED|ERROR|SKIPPED)(\s*$|\s+\()"  # not a log line's level
        o = re.search(r"\s" + word, line) if m else re.match(word, line)
        if f and o:
            per[f][o.group(1)] += 1
    for what in ("teardown: destroyed", "teardown: aborted", "did not return within"):
        if what in text:  # per rank and engine shutdown
            per[f"{name}.log"][what] += text.count(what)
summary = {k: dict(v) for k, v in sorted(per.items())}
json.dump({"summary": summary}, open(f"{out}/summary.json", "w"), indent=1)
for k, v in summary.items():
    print(f"{k}: {v}")
PY
echo "== session15_tp_tests done in $((SECONDS - start)) s"
