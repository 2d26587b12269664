#!/usr/bin/env bash
# #16 tiers target (one H200, < 200 s): 25% of a 48 x 4K-chunk library (8B dims, 24 GiB)
# GPU-resident at B = 256, against all-resident in the same run: the H2D floor, the tiered
# path with every chunk resident (its overhead alone), LFU wait / skip, the chunk-affinity
# scheduler (library/tier_affinity.py) and residency-biased routing moving every
# non-resident selection (library/tier_bias.py, sync-free reads). Zipf(1.0) and uniform,
# churn 0.05 and 0.7 (moska-code-20m keeps 0.31 of a layer's chunks per step); then top-8.
# Carry .whl. Correctness: the slot-table kernel's CUDA test, and each affinity / biased run
# checks its first step against the all-resident kernel (check_rel_err_vs_resident).
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
TRITON_INTERPRET=0 timeout 25 python3 -m pytest -q -p no:cacheprovider -m cuda \
  "tests/library/test_tiers.py::test_kernel_permuted_slot_table_equals_reference" \
  > "$OUT/tiers_tests.log" 2>&1; echo "cuda test rc=$?"
timeout 115 python3 -m moska.bench.tiers --steps 8 --warmup 2 --churns 0.05,0.7 \
  --modes lfu-wait,lfu-skip,allhit-wait,affinity-wait,biased1.0-wait \
  --out "$OUT/tiers_h200_s14.json" > "$OUT/tiers.log" 2>&1; echo "tiers rc=$?"
timeout 50 python3 -m moska.bench.tiers --steps 6 --warmup 2 --top-k 8 --dists zipf1.0 \
  --churns 0.7 --modes lfu-wait,affinity-wait,biased1.0-wait \
  --out "$OUT/tiers_h200_s14_top8.json" > "$OUT/tiers_top8.log" 2>&1; echo "tiers top8 rc=$?"
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
for f in ("tiers_h200_s14", "tiers_h200_s14_top8"):
    try:
        s = json.load(open(f"{o}/{f}.json"))["summary"]
    except Exception as e:  # noqa: BLE001
        print(f, "no summary:", e)
        continue
    print(f, "H2D GiB/s", round(s.pop("h2d_gib_per_s"), 1))
    for w, m in s.items():
        print(" ", w, "resident tok/s", round(m["resident_tokens_per_s"]),
              "0.8x needs hit", round(m["for_0.8x"]["needed_hit_rate"], 3))
        for mode, r in m.items():
            if isinstance(r, dict) and "ratio_vs_resident" in r:
                print("   ", mode, {k: (round(v, 3) if isinstance(v, float) else v)
                                   for k, v in r.items()})
PY
tail -3 "$OUT/tiers_tests.log" | cut -c1-300
for f in tiers tiers_top8; do tail -2 "$OUT/$f.log" | cut -c1-300; done
