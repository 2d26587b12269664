#!/usr/bin/env bash
# Set up moska in ./.venv. Usage: bash scripts/setup.sh [extra]   (extra: test, default none)
# - A machine whose python3 already has torch (a GPU box): the venv sees system packages,
#   so that torch is kept and nothing CUDA-sized is downloaded.
# - Otherwise: the CPU build of torch 2.13.0, pinned by constraints-cpu.txt (no download of
#   CUDA wheels; a missing local CPU wheel fails fast).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if "$py" -c "import torch" 2>/dev/null; then
    "$py" -m venv --system-site-packages .venv
  else
    "$py" -m venv .venv
  fi
fi
pip() { .venv/bin/python -m pip "$@"; }
spec="."
[ -n "$extra" ] && spec=".[$extra]"
if .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install -q -e "$spec"
else
  pip install -q -c constraints-cpu.txt "torch==2.13.0"
  pip install -q -c constraints-cpu.txt -e "$spec"
fi
echo "moska is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
