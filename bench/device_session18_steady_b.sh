#!/usr/bin/env bash
# #20 item 4, the second steady-state run of session 18: `device_session18_steady.sh` on
# another query stream (seed 1: other documents drawn, other variants), to see whether
# call 1's min 0.93 of warm holds. One H200, ~75 s. Carry .whl-min and .models/tok-code.
# `bash bench/device_session18_steady_b.sh --cpu-dry-run`: the CPU form.
STEADY_SEED=1 exec bash "$(dirname "$0")/device_session18_steady.sh" "$@"
