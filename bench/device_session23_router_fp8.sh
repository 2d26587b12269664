#!/usr/bin/env bash
# Session 23, #16: the key-max router on FP8 tensor cores against the fp16 kernel, then the
# FP8 router's CUDA test (moska/bench/router_fp8_speed.py, tests/kernels/test_router_fp8.py).
set -u
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 -m moska.bench.router_fp8_speed --out "$OUT/router_fp8_speed.json" ${ARGS:-}
