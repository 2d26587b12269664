#!/usr/bin/env bash
# Half b of bench/device_session18_final.sh (the CUDA-marked tests) on the GPU the runner gives.
FINAL_HALF=b exec bash bench/device_session18_final.sh "$@"
