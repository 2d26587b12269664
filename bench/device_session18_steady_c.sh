#!/usr/bin/env bash
# #20 item 4, the third steady-state run of session 18: `device_session18_steady.sh` on a
# third query stream (seed 2), after the re-rotation kernel's token count stopped being
# specialized; each query's Triton JIT misses are recorded, to see the one early outlier
# of calls 1-2 gone (or what compiles instead). One H200, ~80 s. Carry .whl-min and
# .models/tok-code. `bash bench/device_session18_steady_c.sh --cpu-dry-run`: the CPU form.
STEADY_SEED=2 exec bash "$(dirname "$0")/device_session18_steady.sh" "$@"
