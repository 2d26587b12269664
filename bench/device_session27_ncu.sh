#!/usr/bin/env bash
# Session 27, #16: Nsight Compute on one grouped step of bf16 and of the FP8 tensor-core
# program at B = 1,024 (bench/fp8_ncu_probe.py, one H200). Carry .whl-min (or .whl).
# Reports: $OUT/ncu_grouped.ncu-rep and its details as CSV ($OUT/ncu_grouped.csv).
. bench/device_prologue.sh ncu27
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
SECTIONS=${SECTIONS:-"SpeedOfLight MemoryWorkloadAnalysis WarpStateStats SchedulerStats Occupancy LaunchStats ComputeWorkloadAnalysis InstructionStats"}
ARGS=(); for s in $SECTIONS; do ARGS+=(--section "$s"); done
ARGS+=(--metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,lts__t_sector_hit_rate.pct,regex:sm__(inst_executed_pipe|pipe)_.*avg\.pct_of_peak_sustained_active")
# shellcheck disable=SC2086
timeout "${LIMIT:-300}" "$NCU" --clock-control none --profile-from-start off \
  -k "regex:_grouped_" "${ARGS[@]}" -f -o "$OUT/ncu_grouped" \
  python3 bench/fp8_ncu_probe.py ${B:-1024} > "$OUT/ncu.log" 2>&1
echo "ncu rc=$? ($(( $(date +%s) - T0 )) s)"; tail -5 "$OUT/ncu.log" | cut -c1-400
"$NCU" --import "$OUT/ncu_grouped.ncu-rep" --page details --csv > "$OUT/ncu_grouped.csv" 2>&1
echo "csv lines $(wc -l < "$OUT/ncu_grouped.csv")"
python3 - "$OUT/ncu_grouped.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
keep = ("Duration", "DRAM Throughput", "L2 Cache Throughput", "L1/TEX Cache Throughput",
        "Compute (SM) Throughput", "L2 Hit Rate", "Achieved Occupancy", "Theoretical Occupancy",
        "Registers Per Thread", "Block Limit", "Warp Cycles Per Issued Instruction",
        "Issue Slots Busy", "Executed Ipc Active", "No Eligible", "One or More Eligible",
        "Active Warps Per Scheduler", "Eligible Warps Per Scheduler", "Memory Throughput",
        "Max Bandwidth", "Mem Busy", "SM Frequency", "Stall", "stalled", "lts__", "pipe")
for r in rows:
    n = r.get("Metric Name", "")
    if any(k in n for k in keep):
        print(r.get("Kernel Name", "")[:28], "|", r.get("Section Name", "")[:22], "|", n, "|", r.get("Metric Value"), r.get("Metric Unit"))
PY
