#!/usr/bin/env bash
# #16 tiers, the tiered step's own cost (one H200, < 150 s). Session 14 measured the tiered
# path with every chunk resident (allhit-wait) at 0.44-0.63x of all-resident, before any
# copy: a host sync per layer (unique().tolist()) and the bookkeeping behind it. Now a layer
# that cannot miss reads nothing on the host (counts settle once per step: library/
# tier_ledger.py), slot tables upload non-blocking, the skip policy can run sync-free
# (sync="step": lfu-skip-step) and the biased bench routes on the device (its numpy remap
# alone took as long as an all-resident step) with no per-layer bincount (a sync).
# 1. correctness: the slot-table kernel and the sync-free reads on CUDA (pinned table uploads,
#    events on the counts' copies), each "wait" bench mode's first read vs all-resident;
# 2. host syncs / device ops per layer counted on the GPU (tier_host_work);
# 3. timings at 8B dims, B = 256, 25% resident (48 x 4K chunks), Zipf(1.0) and uniform.
# Carry .whl.
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
TRITON_INTERPRET=0 timeout 40 python3 -m pytest -q -p no:cacheprovider -m cuda \
  "tests/library/test_tiers.py::test_kernel_permuted_slot_table_equals_reference" \
  tests/library/test_tiers_sync.py > "$OUT/tiers_sync_tests.log" 2>&1; echo "cuda tests rc=$?"
timeout 25 python3 -m moska.bench.tier_host_work --device cuda \
  --out "$OUT/tier_host_work_h200.json" > "$OUT/tier_host_work.log" 2>&1; echo "host work rc=$?"
timeout 80 python3 -m moska.bench.tiers --steps 10 --warmup 3 --churns 0.7 \
  --modes allhit-wait,lfu-skip,lfu-skip-step,biased1.0-wait \
  --out "$OUT/tiers_h200_s14b.json" > "$OUT/tiers.log" 2>&1; echo "tiers rc=$?"
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
try:
    print("host work [syncs, ops] per layer", json.load(open(f"{o}/tier_host_work_h200.json"))["summary"])
except Exception as e:  # noqa: BLE001
    print("host work: no summary:", e)
try:
    s = json.load(open(f"{o}/tiers_h200_s14b.json"))["summary"]
except Exception as e:  # noqa: BLE001
    s = None
    print("tiers: no summary:", e)
if s:
    print("H2D GiB/s", round(s.pop("h2d_gib_per_s"), 1))
    for w, m in s.items():
        print(" ", w, "resident tok/s", round(m["resident_tokens_per_s"]))
        for mode, r in m.items():
            if isinstance(r, dict) and "ratio_vs_resident" in r:
                keep = ("ratio_vs_resident", "gpu_hit_rate", "gpu_gib_per_step",
                        "selections_kept_share", "check_rel_err_vs_resident", "host_remap_s")
                print("   ", mode, {k: round(r[k], 4) for k in keep if k in r})
PY
tail -3 "$OUT/tiers_sync_tests.log" | cut -c1-300
for f in tier_host_work tiers; do tail -2 "$OUT/$f.log" | cut -c1-300; done
