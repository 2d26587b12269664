"""The floor every kernel benchmark divides a measured time by, and the costs it counts.

A step's floor is max(bytes / read bandwidth, FLOPs / matmul FLOP/s), both ceilings measured
in the same run (`bandwidth.measure_ceilings` for the read stream, `measure_matmul` here).
A floor from reads alone is the wrong floor where the step is compute-bound: the grouped
shared kernel at B = 1,024 and GQA G >= 4 does 32G query rows of work per chunk token it
reads, and its read floor then sits far below any time a tensor core can reach. Each floor
says which bound binds ("read" or "compute"), so a low fraction reads as what it is.

The counts are what the kernel must do, not what it happens to do: bytes are every distinct
input byte read once from HBM (a chunk read by many requests counts once, an input small
enough to sit in L2 counts once), FLOPs are the two matmuls of attention (QK^T and PV, 2
FLOPs a multiply-add) for every (query row, key token) pair computed, with G query heads per
KV head; tile padding, softmax and re-reads are the kernel's own cost and stay out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch


def floor_ms(nbytes: float, flops: float, read_bytes_per_s: float, flops_per_s: float) -> dict:
    """{read_floor_ms, compute_floor_ms, floor_ms, bound} of a step of `nbytes` and `flops`."""
    if read_bytes_per_s <= 0 or flops_per_s <= 0:
        raise ValueError(f"ceilings must be positive, got {read_bytes_per_s}, {flops_per_s}")
    read = nbytes / read_bytes_per_s * 1e3
    compute = flops / flops_per_s * 1e3
    return {
        "read_floor_ms": read,
        "compute_floor_ms": compute,
        "floor_ms": max(read, compute),
        "bound": "compute" if compute > read else "read",
    }


def attention_flops(query_rows: int, key_tokens: int, head_dim: int) -> int:
    """QK^T plus PV over every (query row, key token) pair: 2 matmuls x 2 FLOPs x D."""
    return 4 * query_rows * key_tokens * head_dim


def grouped_shared_cost(
    sel_rows: int,
    gqa: int,
    touched_chunks: int,
    chunk_len: int,
    num_kv_heads: int,
    head_dim: int,
    batch: int,
    elem_bytes: int,
) -> tuple[int, int]:
    """(bytes, FLOPs) of the grouped shared kernel over `sel_rows` selections (request, KV
    head, chunk): K and V of every touched chunk once, the queries once, and one output row
    (plus its LSE, ignored: 1/D of a row) per selection and query head; every selection
    runs its G query heads over the chunk's tokens."""
    kv = touched_chunks * chunk_len * num_kv_heads * head_dim * 2 * elem_bytes
    q_and_out = (batch * num_kv_heads * gqa + sel_rows * gqa) * head_dim * elem_bytes
    return kv + q_and_out, attention_flops(sel_rows * gqa, chunk_len, head_dim)


def router_cost(
    scorer: str,
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_chunks: int,
    chunk_len: int,
    rank: int,
    shortlisted_chunks: int,
    shortlist: int,
    summary_bytes: int = 2,
    lowrank_bytes: int = 2,
) -> tuple[int, int]:
    """(bytes, FLOPs) of `moska.kernels.router.route` in front of the step.

    mean: one summary (mean key) per (chunk, KV head). two_stage: the bound's two summaries
    (key max, key min), then key-max over the low-rank keys ([L, Hkv, rank], fp16) of the
    chunks that some request shortlisted (`shortlisted_chunks`, counted in the run, not
    assumed to be all of them), one logit per (query head, key) of each of the `shortlist`
    pairs per request; scoring the summaries is B x Hq x C x D multiply-adds per summary.
    keymax (the default policy: no shortlist): every chunk's low-rank keys, one logit per
    (query head, key) of every request; `shortlisted_chunks` and `shortlist` are ignored."""
    if scorer.startswith("keymax"):
        lowrank = num_chunks * chunk_len * num_kv_heads * rank * lowrank_bytes
        return lowrank, 2 * batch * num_chunks * chunk_len * num_q_heads * rank
    if scorer == "mean":
        n_sum = 1
    elif scorer.startswith("two_stage"):
        n_sum = 2
    else:
        raise ValueError(
            f"router_cost: scorer must be 'mean', 'keymax*' or 'two_stage*', got {scorer!r}"
        )
    nbytes = n_sum * num_chunks * num_kv_heads * head_dim * summary_bytes
    flops = n_sum * 2 * batch * num_q_heads * num_chunks * head_dim
    if n_sum == 2:
        nbytes += shortlisted_chunks * chunk_len * num_kv_heads * rank * lowrank_bytes
        flops += 2 * batch * shortlist * chunk_len * num_q_heads * rank
    return nbytes, flops


def measure_matmul(
    device: str = "cuda", sizes: Sequence[int] | None = None, reps: int = 10
) -> dict:
    """{matmul_flops_per_s, matmul_by_size, matmul_dtype}: the best dense torch.matmul of
    random square matrices (bf16 on the GPU, fp32 on the CPU) over `sizes`, best of `reps`
    calls each: the compute ceiling of the floors (a tensor-core kernel's reachable rate)."""
    cuda = device == "cuda"
    sizes = tuple(sizes or ((4096, 8192, 16384) if cuda else (128, 256)))
    dtype = torch.bfloat16 if cuda else torch.float32
    by_size: dict[str, float] = {}
    for m in sizes:
        a = torch.randn(m, m, device=device, dtype=dtype)
        b = torch.randn(m, m, device=device, dtype=dtype)

        def mm(a: torch.Tensor = a, b: torch.Tensor = b) -> torch.Tensor:
            return torch.matmul(a, b)

        by_size[str(m)] = 2 * m**3 / _best_s(mm, reps, cuda)
        del a, b
    if cuda:
        torch.cuda.empty_cache()
    return {
        "matmul_flops_per_s": max(by_size.values()),
        "matmul_by_size": by_size,
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }


def _best_s(fn: Callable[[], object], reps: int, cuda: bool) -> float:
    """Fastest of `reps` calls in seconds, after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(max(1, reps)):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            best = min(best, a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def kernel_ceilings(
    device: str, dry: bool, reps: int, sizes: Sequence[int] = (8192, 16384)
) -> tuple[dict, float, float]:
    """The kernel benches' ceilings, measured in the run: a read-only stream over 4 GiB
    (1/64 GiB dry) and the best matmul over `sizes` ((256,) dry), best of `reps` (2-3 dry):
    (ceilings, read bytes/s, matmul FLOP/s)."""
    from moska.bench.bandwidth import measure_ceilings

    ceil = measure_ceilings(device, gib=1 / 64 if dry else 4.0, reps=2 if dry else reps, gemm=False)
    ceil.update(measure_matmul(device, sizes=(256,) if dry else sizes, reps=3 if dry else reps))
    return ceil, ceil["read_bytes_per_s"], ceil["matmul_flops_per_s"]
