#!/usr/bin/env bash
# Session 23 (#22.3): the grouped kernel's lazy rescale A/B and small tiles (bench/kernels_lazy_ab.py),
# one process per arm, arms alternated twice.
set -u
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 PYTHONPATH=.
for round in 1 2; do
  for lazy in 0 1; do
    MOSKA_LAZY_RESCALE=$lazy python3 bench/kernels_lazy_ab.py "$OUT/lazy${lazy}_r${round}.json" 2>&1 | grep -v Warn
  done
  [ "${ROUNDS:-2}" = 1 ] && break
done
