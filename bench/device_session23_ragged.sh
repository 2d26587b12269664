#!/usr/bin/env bash
# Session 23, #22.2/#22.3: the grouped shared step as one ragged cuDNN / FA2 varlen call over a
# chunk-major pool, against the Triton grouped kernel (moska/bench/kernels_grouped_ragged.py).
set -u
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
python3 -c "import torch; print(torch.__version__, torch.backends.cudnn.version())"
python3 -m moska.bench.kernels_grouped_ragged --out "$OUT/kernels_grouped_ragged.json" \
  --budget-s "${BUDGET:-200}" ${ARGS:-}
