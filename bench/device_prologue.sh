# Sourced by device scripts (`. bench/device_prologue.sh NAME`): offline and compiled-kernel
# settings, $OUT (made), $T0 (start, epoch s), and the carried wheels (.whl-min, else .whl)
# installed into /tmp/site_NAME and put on PYTHONPATH with the checkout.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
WHL=.whl-min; [ -d "$WHL" ] || WHL=.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "/tmp/site_$1" "$WHL"/*.whl
export PYTHONPATH=/tmp/site_$1:$PWD
