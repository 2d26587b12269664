"""The FP8 reachability benchmark's arithmetic (`moska.bench.fp8_reach`, `fp8_reach_e2e`):
its floors from given ceilings, the rejection of a softmax floor no kernel obeys, the
verdict against bf16's time / 1.6, and the end-to-end Amdahl bound of a decode profile."""

import torch

from moska.bench.fp8_attention import Shape
from moska.bench.fp8_reach import TARGET, floors
from moska.bench.fp8_reach_e2e import end_to_end, grouped_fp8_floor_ms

S = Shape(32, 8, 128, 4096, 256, 8, torch.bfloat16, "cuda")
CEIL = {
    "read_bytes_per_s": 4.0e12,
    "gemm_flops_per_s": 8.0e14,
    "fp8_gemm_flops_per_s": 1.6e15,
    "softmax_scores_per_s": 2.0e12,
    "softmax_f16_exp2_scores_per_s": 1.0e12,  # the slower form: the faster one counts
}


def test_floors_of_the_b1024_step():
    f = floors(S, 1024, 256, CEIL, bf16_ms=1.6, fastest_ms=1.0)
    rows = 1024 * 8 * 8 * 4
    assert f["query_rows"] == rows and f["scores"] == rows * 4096
    kv = 256 * 4096 * 8 * 128 * 2  # K and V elements of every touched chunk
    q_out = (1024 * 32 + rows) * 128 * 2
    assert f["bf16"]["bytes"] == kv * 2 + q_out
    assert abs(f["bf16"]["read_floor_ms"] - (kv * 2 + q_out) / 4e12 * 1e3) < 1e-9
    flops = 4 * rows * 4096 * 128
    assert abs(f["fp8_one_term_q"]["tensor_floor_ms"] - flops / 1.6e15 * 1e3) < 1e-9
    assert abs(f["fp8_q_split"]["tensor_floor_ms"] - 1.5 * flops / 1.6e15 * 1e3) < 1e-9
    assert abs(f["bf16"]["softmax_floor_ms"] - rows * 4096 / 2e12 * 1e3) < 1e-9
    for k in ("bf16", "fp8_one_term_q", "fp8_q_split"):
        parts = [f[k][x] for x in ("read_floor_ms", "tensor_floor_ms", "softmax_floor_ms")]
        assert f[k]["floor_ms"] == max(parts)
    assert f["target_ms"] == 1.6 / TARGET
    assert f["fp8_q_split"]["target_reachable"] == (f["fp8_q_split"]["floor_ms"] <= 1.0)


def test_a_softmax_floor_above_a_measured_time_is_dropped():
    slow = {**CEIL, "softmax_scores_per_s": 1e11, "softmax_f16_exp2_scores_per_s": 1e11}
    f = floors(S, 1024, 256, slow, bf16_ms=1.6, fastest_ms=1.0)
    assert f["softmax_floor_rejected"]["softmax_floor_ms"] > 1.0
    assert f["fp8_q_split"]["softmax_floor_ms"] is None
    assert f["fp8_q_split"]["floor_ms"] < 1.0  # read and tensor only
    # a batch the target cannot reach: bf16's time / 1.6 under the FP8 floor
    f = floors(S, 1024, 256, CEIL, bf16_ms=0.5, fastest_ms=1.0)
    assert not f["fp8_q_split"]["target_reachable"]


def test_end_to_end_bound_of_a_decode_profile():
    shape = {"library_tokens": 524288, "chunk_size": 4096, "top_k": 8}
    floor = grouped_fp8_floor_ms(shape, 256, 32, 4.0e12)
    per_layer = 128 * 4096 * 8 * (2 * 128 + 4 * (1 + 1 / 128)) + (256 * 32 + 256 * 64 * 4) * 256
    assert abs(floor - 32 * per_layer / 4.0e12 * 1e3) < 1e-9
    decode = {
        "shape": shape,
        "rows": [
            {"mode": "bf16", "batch": 256, "step_ms": 47.0, "kernel_ms": {"grouped": 17.0}},
            {"mode": "fp8_x", "batch": 256, "step_ms": 41.0, "kernel_ms": {"grouped": 10.0}},
        ],
    }
    e = end_to_end({"ceilings": {"read_bytes_per_s": 4.0e12}}, decode, 32)
    assert e["step_bound_ms"] == round(47.0 - 17.0 + floor, 3)
    assert e["max_speedup_fp8_can_give"] == round(47.0 / (30.0 + floor), 3)
    assert e["speedup"]["fp8_x"] == round(47 / 41, 3)
    assert e["reachable"] == (47.0 / (30.0 + floor) >= 1.3)
