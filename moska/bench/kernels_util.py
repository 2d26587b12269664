"""Shared helpers of the kernel benchmark: shapes, timing, selections, ceilings."""

import torch
from triton.testing import do_bench

from moska.bench.bandwidth import measure_ceilings
from moska.bench.common import capture_graph
from moska.bench.floors import measure_matmul
from moska.kernels.selections import Selections, from_topk

HQ, HKV, D = 32, 8, 128
G = HQ // HKV
DT = torch.bfloat16
SCALE = D**-0.5
DEV = "cuda"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against the reference b (norm-wise, in float64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench(fn, rep=100):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")  # ms


def bench_graph(fn):
    """Median ms of fn captured in a CUDA graph (no host launch overhead), as a decode step runs."""
    replay = capture_graph(fn)
    t = bench(replay)
    del replay
    return t


def log(*a):
    print(*a, flush=True)


def sorted_sel(chunk_idx, num_chunks):
    """Selections for every KV head of each request's chunks [B, k], as the router makes
    them: sorted by (chunk, kv_head, req), with the (req, kv_head) order for the merge."""
    return from_topk(chunk_idx.view(chunk_idx.shape[0], 1, -1), HKV, num_chunks)


def pairs_sel(req, chunk, b):
    """Selections for every KV head of ragged (req, chunk) pairs [P], by a sort."""
    head = torch.arange(HKV, device=req.device)
    key = ((chunk.long()[:, None] * HKV + head[None, :]) * b + req.long()[:, None]).flatten()
    key = torch.sort(key).values
    return Selections((key % b).int(), ((key // b) % HKV).int(), (key // (b * HKV)).int())


def ceilings(device: str = DEV) -> tuple[float, float, dict]:
    """(matmul TFLOP/s, read GB/s, the ceilings dict) measured in this run: every floor is
    max(bytes / read bandwidth, FLOPs / matmul FLOP/s) (moska/bench/floors.py says why);
    gemm_flops_per_s is the best dense bf16 torch.matmul over several sizes."""
    cpu = device != "cuda"  # dry runs: a small tensor, the figures only exercise the code
    c = measure_ceilings(device, gib=1 / 64 if cpu else 4.0, reps=2 if cpu else 10, gemm=False)
    c.update(measure_matmul(device))
    c["gemm_flops_per_s"] = c["matmul_flops_per_s"]
    return c["gemm_flops_per_s"] / 1e12, c["read_bytes_per_s"] / 1e9, c


def kernel_breakdown(fn, reps=20):
    """Mean GPU time per call of each kernel fn launches (us), from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            out[e.key[:60]] = round(e.device_time_total / reps, 2)
    return out
