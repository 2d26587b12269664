"""One-off: a single key-max pair-scoring launch at B = 1024 (for a profiler to look at)."""

# Usage on the GPU machine: PYTHONPATH=. ncu ... python3 bench/keymax_one.py [fp16|bf16]
import sys

import torch

from moska.bench.kernels_util import DT, HKV, HQ, D
from moska.kernels import router
from moska.kernels.router_scores import keymax_pair_scores
from moska.kernels.selections import from_topk

torch.manual_seed(0)
C, L, B = 256, 4096, 1024
k = torch.randn(C * L, HKV, D, device="cuda", dtype=DT)
offs = torch.arange(0, C * L + 1, L, dtype=torch.int32, device="cuda")
index = router.build_routing_index(k, offs)
lk = index.lowrank_keys if sys.argv[1:] != ["bf16"] else index.lowrank_keys.to(DT)
q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
short = router.score_chunks(q, index, "bound").sum(1).topk(32, -1).indices
pairs = from_topk(short[:, None, :], 1, C)
for _ in range(3):
    keymax_pair_scores(q, index.basis, lk, offs, pairs.req, pairs.chunk)
torch.cuda.synchronize()
