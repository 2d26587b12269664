"""The benchmark floor: max(bytes / read bandwidth, FLOPs / matmul FLOP/s), the bound that
binds, and the FLOPs it counts for the grouped shared kernel (checked against the matmuls
the plain-PyTorch reference actually runs, so the count is not the formula restated)."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from moska.bench.bandwidth import fractions_over
from moska.bench.floors import floor_ms, grouped_shared_cost, measure_matmul, router_cost
from moska.kernels.selections import from_topk
from moska.kernels.shared_attention import grouped_shared_attention_ref


class MatmulFlops(TorchFunctionMode):
    """2 M N K FLOPs of every 2-D matmul run under it (torch's FlopCounterMode imports
    dynamo on first use: seconds; this mode costs nothing)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.matmul, torch.Tensor.__matmul__, torch.matmul, torch.mm):
            a, b = args[0], args[1]
            assert a.dim() == 2 and b.dim() == 2, "count only plain 2-D matmuls"
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def test_floor_is_the_larger_bound_and_names_it():
    read_bps, flops_ps = 4.7e12, 8.0e14
    # 4.7 GB in 1 ms of reads, 0.4 TFLOP in 0.5 ms of compute: read-bound
    f = floor_ms(4.7e9, 4.0e11, read_bps, flops_ps)
    assert f["read_floor_ms"] == pytest.approx(1.0)
    assert f["compute_floor_ms"] == pytest.approx(0.5)
    assert f["floor_ms"] == pytest.approx(1.0) and f["bound"] == "read"
    # four times the FLOPs on the same bytes: compute-bound at 2 ms
    f = floor_ms(4.7e9, 1.6e12, read_bps, flops_ps)
    assert f["floor_ms"] == pytest.approx(2.0) and f["bound"] == "compute"
    with pytest.raises(ValueError):
        floor_ms(1.0, 1.0, 0.0, flops_ps)


def test_grouped_shared_flops_match_the_reference_matmuls():
    torch.manual_seed(0)
    b, hkv, g, d, chunks, chunk_len, topk = 3, 2, 4, 16, 5, 8, 2
    k = torch.randn(chunks * chunk_len, hkv, d)
    v = torch.randn_like(k)
    q = torch.randn(b, hkv * g, d)
    offs = torch.arange(0, chunks * chunk_len + 1, chunk_len, dtype=torch.int32)
    chunk = torch.rand(b, chunks).topk(topk, -1).indices
    sel = from_topk(chunk.view(b, 1, topk), hkv, chunks, use_triton=False)
    with MatmulFlops() as counter:
        grouped_shared_attention_ref(q, k, v, offs, sel, d**-0.5)
    n = sel.req.numel()
    assert n == b * topk * hkv
    touched = int(torch.unique(chunk).numel())
    nbytes, flops = grouped_shared_cost(n, g, touched, chunk_len, hkv, d, b, 4)
    assert flops == counter.flops > 0  # QK^T and PV, G query heads per selection
    kv = touched * chunk_len * hkv * d * 2 * 4
    assert nbytes == kv + (q.numel() + n * g * d) * 4  # K, V once; queries; partial outputs


def test_router_cost_counts_only_the_shortlisted_low_rank_keys():
    args = {"batch": 64, "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128}
    args |= {"num_chunks": 256, "chunk_len": 4096, "rank": 32, "shortlist": 32}
    mean_b, mean_f = router_cost("mean", shortlisted_chunks=0, **args)
    assert mean_b == 256 * 8 * 128 * 2  # one summary per (chunk, KV head)
    b155, f155 = router_cost("two_stage", shortlisted_chunks=155, **args)
    b256, f256 = router_cost("two_stage", shortlisted_chunks=256, **args)
    assert b256 - b155 == 101 * 4096 * 8 * 32 * 2  # fp16 low-rank keys of 101 more chunks
    assert f155 == f256  # FLOPs follow the pairs (B x shortlist), not the chunk set
    pairs, logits_per_pair = 64 * 32, 32 * 4096
    assert f155 - 2 * mean_f == 2 * pairs * logits_per_pair * 32
    # the default (key-max per KV head): every chunk's low-rank keys, every request
    kb, kf = router_cost("keymax", shortlisted_chunks=1, **args)
    assert kb == 256 * 4096 * 8 * 32 * 2 and kf == 2 * 64 * 256 * 4096 * 32 * 32
    with pytest.raises(ValueError):
        router_cost("bound", shortlisted_chunks=1, **args)


def test_matmul_ceiling_is_the_best_size_and_a_fraction_over_one_is_flagged():
    m = measure_matmul("cpu", sizes=(32, 64), reps=1)
    assert set(m["matmul_by_size"]) == {"32", "64"}
    assert m["matmul_flops_per_s"] == max(m["matmul_by_size"].values()) > 0
    row = {"bound": "compute", "roofline_fraction_with_router_two_stage": 1.011}
    assert fractions_over({"grouped": [row]}) == [
        "grouped[0].roofline_fraction_with_router_two_stage=1.0110"
    ]
