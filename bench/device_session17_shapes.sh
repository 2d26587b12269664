#!/usr/bin/env bash
# #22 items 3-4, session 17 (one H200, kind nvidia-h200; < 150 s; carry .whl-min).
# 1) correctness first: the CUDA tests of `one_chunk_attention` (Triton, cuDNN, flash and the
#    table's dispatch, bf16 vs an fp32 reference, eager and in a CUDA graph) and of the
#    engine's seam (attention/shared.py: a library read whole through the dispatcher, merged,
#    vs the PyTorch reference), while 12 processes compile the Triton tiles of steps 2-3;
# 2) `moska.bench.kernels_one_chunk --table-only --rounds 4`: one 128K-token chunk read by
#    B = 256 / 1,024 requests (call 1 also timed 16 / 64: kernels_one_chunk_h200_session17.json),
#    D 64/128 x G 1/2/4/8: every call checked (o, lse) first, then the
#    table's Triton tile, cuDNN / flash with LSE, the dispatcher and the SDPA baselines (no
#    LSE, graph and eager) timed in 4 rotated rounds; the summary's paired ratios compare
#    calls round by round (session 16b: the same cuDNN call drifted 6.4 -> 7.7 ms between
#    rounds); x_same_pair is the dispatcher against the very call it makes;
# 3) `moska.bench.kernels_shapes_variants --high-g`: the grouped kernel at G 4 / 8, B = 1,024
#    (1M shared tokens, 4,096-token chunks, top-8, uniform and Zipf) with the HIGH_G tiles,
#    each checked (bf16 vs the reference) before it is timed, with the row tiles a group
#    makes and the L2 stream they read (64-row tiles ran at ~6.5 TB/s of L2 in call 1);
# 4) (run before 3) `moska.bench.kernels_whole_library`: a 32-chunk library read whole by B = 64-1,024
#    requests, the grouped path (a state per chunk, merged) against the engine's new path
#    (one span through the dispatcher), both merged into the rows' own state and checked.
# Floors from a read-only stream (and the matmul peak) measured in each run; a run with a
# floor fraction > 1.0 exits non-zero. JSONs (*_session17b.json: call 2) under $OUT.
# `bash bench/device_session17_shapes.sh --cpu-dry-run`: the same steps in CPU forms.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_s17_shapes
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$TRITON_CACHE_DIR"
T0=$(date +%s)
OC="--table-only --rounds 4 --rep-ms 10"
if [ "${1:-}" = "--cpu-dry-run" ]; then
  PY=${PY:-.venv/bin/python}; export TRITON_INTERPRET=1; DRY="--cpu-dry-run"; NW=2
  TESTS="tests/kernels/test_shared_one_chunk.py tests/engine/test_one_chunk_seam.py"; TT=150
  OC="$OC --b-list 2"; HGT=150; WLT=120; OCT=120
else
  PY=python3; export TRITON_INTERPRET=0; DRY=""; NW=8
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_shapes17 .whl-min/*.whl
  export PYTHONPATH=/tmp/site_shapes17:$PWD
  TESTS="tests/kernels/test_shared_one_chunk_cuda.py tests/engine/test_one_chunk_seam_cuda.py"
  TT=50; HGT=48; WLT=24; OCT=34; OC="$OC --b-list 256,1024"  # call 1 timed B 16-64 (kept)
  echo "installed in $(( $(date +%s) - T0 )) s"
fi
NO=$(( NW / 2 ))  # the one-chunk run (table tiles only) compiles fewer kernels
for i in $(seq 0 $((NO - 1))); do
  timeout 45 $PY -m moska.bench.kernels_one_chunk $DRY $OC --warm "$i/$NO" \
    > "$OUT/warm_oc_$i.log" 2>&1 &
done
for i in $(seq 0 $((NW - 1))); do
  timeout 45 $PY -m moska.bench.kernels_shapes_variants $DRY --high-g --warm "$i/$NW" \
    > "$OUT/warm_hg_$i.log" 2>&1 &
done
# the engine with a library read whole (top_k 10**6): CUDA-graph replay vs eager, tokens,
# logprobs and routed chunks (the one-span path and its report), beside the kernel tests
timeout 70 $PY -m pytest -q -p no:cacheprovider \
  "tests/engine/test_cuda_graphs_cuda.py::test_graph_replay_matches_eager[docs-1000000-False]" \
  > "$OUT/engine_tests.log" 2>&1 &
timeout $TT $PY -m pytest -q -p no:cacheprovider $TESTS > "$OUT/tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - T0 )) s: $(tail -1 "$OUT/tests.log" | cut -c1-200)"
grep -h "FAILED\|Error" "$OUT/tests.log" | cut -c1-240 | head -6
wait
echo "engine test (graphs, library read whole): $(tail -1 "$OUT/engine_tests.log" | cut -c1-160)"
grep -h "FAILED\|Error" "$OUT/engine_tests.log" | cut -c1-240 | head -4
echo "warm-up (compiles) done at $(( $(date +%s) - T0 )) s; failures:"
grep -h "failed" "$OUT"/warm_*.log | cut -c1-200 | head -4
timeout $OCT $PY -m moska.bench.kernels_one_chunk $DRY $OC --out "$OUT" --budget-s 20 \
  --name kernels_one_chunk_h200_session17b.json > "$OUT/one_chunk.log" 2>&1
echo "one_chunk rc=$? at $(( $(date +%s) - T0 )) s"
timeout $WLT $PY -m moska.bench.kernels_whole_library $DRY --out "$OUT" --budget-s 8 \
  --name kernels_whole_library_h200_session17b.json > "$OUT/whole.log" 2>&1
echo "whole_library rc=$? at $(( $(date +%s) - T0 )) s"
timeout $HGT $PY -m moska.bench.kernels_shapes_variants $DRY --high-g --out "$OUT" --budget-s 34 \
  --name kernels_shapes_high_g_h200_session17b.json > "$OUT/high_g.log" 2>&1
echo "high_g rc=$? at $(( $(date +%s) - T0 )) s"
grep -h "^read\|^wrong" "$OUT/one_chunk.log" | cut -c1-200
grep -E "^D |^(16|64|128) +[0-9] +(2|256|1024) " "$OUT/one_chunk.log" | cut -c1-200
grep -h "^read\|^grouped_\|^Traceback\|^[A-Za-z]*Error" "$OUT/high_g.log" | cut -c1-200 | head -12
grep -h "^{\|^Traceback\|^[A-Za-z]*Error" "$OUT/whole.log" | cut -c1-230 | head -7
