"""One-off: single-chunk grouped shared attention at B = 1024, S = 128K (for a profiler)."""
# Usage on the GPU machine: PYTHONPATH=. ncu ... python3 bench/shared_one.py
import torch

from moska.bench.kernels_util import DT, HKV, HQ, SCALE, D, sorted_sel
from moska.kernels.shared_attention import grouped_shared_attention

torch.manual_seed(0)
S, B = 131072, 1024
k = torch.randn(S, HKV, D, device="cuda", dtype=DT)
v = torch.randn_like(k)
offs = torch.tensor([0, S], dtype=torch.int32, device="cuda")
q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
sel = sorted_sel(torch.zeros(B, 1, dtype=torch.long, device="cuda"), 1)
for _ in range(3):
    grouped_shared_attention(q, k, v, offs, sel, SCALE)
torch.cuda.synchronize()
