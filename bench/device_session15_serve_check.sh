#!/usr/bin/env bash
# Session 15 (one GPU, beside device_session15_serve.sh on the other GPU of x2): #16.4
# correctness of library decode steps replayed from CUDA graphs that run ahead of their
# tokens (asynchronous scheduling; the routing report copied to pinned host memory when the
# step is queued): tokens, logprobs and routed chunks equal the eager engine's, through
# batch buckets 16..1 (graph replay vs eager, a 2-chunk top-k over a small library), and
# async vs sync on CUDA. Carry .whl only.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=/tmp/site_serve15_check  # its own: two scripts installing into one --target race
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH=$SITE:$PWD
TRITON_INTERPRET=0 timeout 140 python3 -m pytest -q -p no:cacheprovider -rs \
  "tests/engine/test_cuda_graphs_cuda.py::test_graph_replay_matches_eager[docs-2-False]" \
  "tests/engine/test_cuda_graphs_cuda.py::test_graph_replay_matches_eager[docs-None-True]" \
  "tests/engine/test_cuda_graphs_cuda.py::test_async_scheduling_matches_sync" \
  > "$OUT/serve_cuda_tests.log" 2>&1
echo "cuda tests rc=$?"
tail -5 "$OUT/serve_cuda_tests.log" | cut -c1-300
