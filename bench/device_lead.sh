#!/usr/bin/env bash
# The lead's device runner (sessions 14-15): several device scripts in one call (device
# minutes are few; each cold start costs one), each into its own folder, packed into one
# tar per script (a call returns at most 8 files); LIMIT: seconds per script. Usage:
#   bash bench/device_lead.sh "session14_pd" "session14_shapes:0 session15_flexicache_engine:1"
# A phase is space-separated `name` (all GPUs) or `name:GPU` (that GPU alone; the names of
# one phase run at once). `name` runs bench/device_<name>.sh.
set -u
OUT=${OUT:-/tmp/out}
run_one() {  # name [gpu]
  local dir="$OUT/$1"; mkdir -p "$dir"
  local t0=$SECONDS
  if [ -n "${2:-}" ]; then
    CUDA_VISIBLE_DEVICES=$2 OUT=$dir timeout "${LIMIT:-600}" bash "bench/device_$1.sh" \
      > "$dir/stdout.txt" 2>&1
  else
    OUT=$dir timeout "${LIMIT:-600}" bash "bench/device_$1.sh" > "$dir/stdout.txt" 2>&1
  fi
  echo "== $1 rc=$? in $((SECONDS - t0)) s" >> "$dir/stdout.txt"
  tar -C "$OUT" -czf "$OUT/$1.tgz" "$1" && rm -rf "$dir"
}
for phase in "$@"; do
  for item in $phase; do
    run_one "${item%%:*}" "$( [ "${item#*:}" != "$item" ] && echo "${item#*:}")" &
  done
  wait
done
for f in "$OUT"/*.tgz; do
  n=$(basename "$f" .tgz)
  echo "##### $n"; tar -xzOf "$f" "$n/stdout.txt" | cut -c1-300 | tail -n "${TAIL:-40}"
done
