#!/usr/bin/env bash
# Session 27, #16: where the FP8 tensor-core program's warps stall, per SASS instruction
# (Nsight Compute's SourceCounters over bench/fp8_ncu_probe.py, FP8 launch only, one H200).
# Carry .whl-min (or .whl). $OUT/ncu_source.csv: every instruction with its samples; the
# script prints the 40 instructions with the most stall samples and the totals by opcode.
. bench/device_prologue.sh ncus27
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
timeout "${LIMIT:-240}" "$NCU" --clock-control none --profile-from-start off \
  -k "regex:_grouped_fp8_mma" --section SourceCounters --section WarpStateStats \
  -f -o "$OUT/ncu_source" python3 bench/fp8_ncu_probe.py ${B:-1024} > "$OUT/ncu_source.log" 2>&1
echo "ncu rc=$? ($(( $(date +%s) - T0 )) s)"; tail -3 "$OUT/ncu_source.log" | cut -c1-300
"$NCU" --import "$OUT/ncu_source.ncu-rep" --page source --csv --print-source sass \
  > "$OUT/ncu_source.csv" 2> "$OUT/ncu_source_err.log"
echo "source csv lines $(wc -l < "$OUT/ncu_source.csv")"; head -c 600 "$OUT/ncu_source_err.log"
python3 - "$OUT/ncu_source.csv" <<'PY'
import csv, collections, re, sys
rows = list(csv.reader(open(sys.argv[1])))
hdr_i = next(i for i, r in enumerate(rows) if any("Source" == c or "Address" in c for c in r))
hdr = rows[hdr_i]; body = [r for r in rows[hdr_i + 1:] if len(r) == len(hdr)]
print("columns:", hdr[:40])
def col(name):
    return next((i for i, h in enumerate(hdr) if h.startswith(name)), None)
src, samp = col("Source"), col("Warp Stall Sampling (All Samples)") or col("Sampling Data (All)")
if src is None or samp is None:
    sys.exit(f"no Source / samples column: {hdr}")
num = lambda x: float(x.replace(",", "") or 0)
tot = sum(num(r[samp]) for r in body)
by_op = collections.Counter()
for r in body:
    ins = re.sub(r"^@!?U?P\w+\s+", "", r[src].strip())
    by_op[(ins.split() or ["?"])[0].split(".")[0]] += num(r[samp])
print(f"total samples {tot:.0f}")
print("by opcode:", [(o, round(100 * v / tot, 1)) for o, v in by_op.most_common(15)])
for r in sorted(body, key=lambda r: -num(r[samp]))[:40]:
    print(f"{100 * num(r[samp]) / tot:5.1f}%  {r[src][:90]}")
PY
