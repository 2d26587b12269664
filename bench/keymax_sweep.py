"""One-off: key-max pair scoring (two-stage router) by low-rank key dtype and tile shape."""

# Usage on the GPU machine: PYTHONPATH=. python3 bench/keymax_sweep.py  (JSON under $OUT)
import json
import os
import sys

import torch
import triton

from moska.bench.kernels_router import case_keymax_tiles
from moska.bench.kernels_util import DT, HKV, D

torch.manual_seed(0)
k_pool = torch.randn(256 * 4096, HKV, D, device="cuda", dtype=DT)
rows = case_keymax_tiles(k_pool, [256, 1024])
res = {
    "command": "PYTHONPATH=. python3 bench/keymax_sweep.py " + " ".join(sys.argv[1:]),
    "gpu": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "triton": triton.__version__,
    "shapes": {
        "chunks": 256,
        "chunk_len": 4096,
        "Hq": 32,
        "Hkv": HKV,
        "D": D,
        "rank": D // 4,
        "top_k": 8,
        "shortlist": 32,
    },
    "rows": rows,
}
with open(os.path.join(os.environ.get("OUT", "/tmp"), "keymax_sweep.json"), "w") as f:
    json.dump(res, f, indent=1)
for r in rows:
    ms = {k[:-3]: round(v, 3) for k, v in r.items() if k.endswith("_ms")}
    print(r["B"], json.dumps(ms))
    print("  topk_changed", {k[:-13]: round(v, 4) for k, v in r.items() if k.endswith("changed")})
