"""One grouped step of bf16 and of the FP8 tensor-core program (the engine's tile) at B = 1,024
for Nsight Compute (session 27, issue 16): 1M tokens, top-8, 8B dims, uniform routing, as
`moska.bench.fp8_occupancy` times them. Each program runs once to compile, then once between
cudaProfilerStart / Stop, so `ncu --profile-from-start off` sees exactly one launch of each:

    ncu --clock-control none --profile-from-start off --section ... python bench/fp8_ncu_probe.py
"""

import sys

import torch

from moska.bench.fp8_attention import gpu_shape, gsa, make_pools, routing
from moska.kernels.selections import from_topk
from moska.kernels.shared_attention import grouped_shared_attention
from moska.library.fp8_mma import MMA_TILE


def main() -> int:
    b = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    s = gpu_shape(256, 8)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    k, v, offs, q8 = make_pools(s)
    kq, vq = q8["block"]
    scale = s.d**-0.5
    mma = {"kv_scales": (kq.scale, vq.scale), "fp8_mma": True, "v_pool_t": q8["v_t_block"]}
    mma.update(fp8_scale_block=128, use_tma=True, **MMA_TILE)
    q = torch.randn(b, s.hq, s.d, device=s.device).to(s.dtype)
    sel = from_topk(routing(b, s, "uniform", gen).view(b, 1, -1), s.hkv, s.chunks)
    runs = {
        "bf16": lambda: grouped_shared_attention(q, k, v, offs, sel, scale),
        "fp8": lambda: gsa(q, kq.data, vq.data, offs, sel, scale, **mma),
    }
    for fn in runs.values():
        fn()
    torch.cuda.synchronize()
    for name, fn in runs.items():
        torch.cuda.cudart().cudaProfilerStart()
        fn()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        print(f"profiled {name}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
