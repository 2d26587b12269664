"""One-off: GPU time of the split-tile merge of grouped shared attention by merge shape."""

# Usage on the GPU machine: PYTHONPATH=. python3 bench/merge_sweep.py  (JSON under $OUT)
import json
import os
import torch
from moska.bench.kernels_util import D, DT, HKV, HQ, SCALE, kernel_breakdown, rel, sorted_sel
from moska.kernels.shared_attention import grouped_shared_attention

res = []
for S in (131072, 1 << 20):
    k = torch.randn(S, HKV, D, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    offs = torch.tensor([0, S], dtype=torch.int32, device="cuda")
    for B in (16, 64):
        q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
        sel = sorted_sel(torch.zeros(B, 1, dtype=torch.long, device="cuda"), 1)
        o0, _ = grouped_shared_attention(q, k, v, offs, sel, SCALE, merge_m=64, split_b=1)
        for mm, sb in ((64, 1), (8, 8), (4, 8), (8, 32), (4, 32), (2, 32), (16, 4), (1, 32)):
            kw = dict(merge_m=mm, split_b=sb)
            o, _ = grouped_shared_attention(q, k, v, offs, sel, SCALE, **kw)
            kb = kernel_breakdown(lambda: grouped_shared_attention(q, k, v, offs, sel, SCALE, **kw))
            row = dict(S=S, B=B, merge_m=mm, split_b=sb, relerr=rel(o, o0), **kb)
            print(json.dumps(row), flush=True)
            res.append(row)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "merge_sweep.json"), "w"), indent=1)
