"""The ragged-SDPA baseline's packing (kernels_grouped_ragged): one ragged sequence per
(chunk, KV head) group over a chunk-major pool gives the grouped reference's o and lse."""

import pytest
import torch

from moska.bench.kernels_grouped_ragged import problem, ragged_inputs, ragged_step, rel, summarize
from moska.kernels.shared_attention import grouped_shared_attention_ref


@pytest.mark.parametrize("d,g,routing", [(16, 4, "uniform"), (8, 2, "zipf"), (8, 8, "uniform")])
def test_ragged_reference_equals_grouped_reference(d, g, routing):
    torch.manual_seed(d * g)
    p = problem(6, 32, 2, d, g, 10, 3, routing, torch.float32, "cpu")
    o_ref, lse_ref = grouped_shared_attention_ref(
        p["q"], p["k"], p["v"], p["offs"], p["sel"], d**-0.5
    )
    o, lse = ragged_step("reference", p["q"], p["k_cm"], p["v_cm"], p["sel"], p["cu_k"], g,
                         d**-0.5, 10 * g)  # fmt: skip
    assert o.shape == o_ref.shape and lse.shape == lse_ref.shape
    assert rel(o, o_ref) < 1e-5 and rel(lse, lse_ref) < 1e-5


def test_ragged_inputs_rows_and_offsets():
    torch.manual_seed(1)
    p = problem(5, 16, 2, 8, 4, 7, 2, "uniform", torch.float32, "cpu")
    sel, g = p["sel"], 4
    qp, cu = ragged_inputs(p["q"], sel, 5 * 2, g)
    n = sel.req.numel()
    assert qp.shape == (n * g, 1, 8) and cu[0] == 0 and int(cu[-1]) == n * g
    assert bool((cu[1:] >= cu[:-1]).all())
    i = n // 2  # selection i's rows are its request's G query heads of its KV head
    r, h = int(sel.req[i]), int(sel.kv_head[i])
    assert torch.equal(qp[i * g : (i + 1) * g, 0], p["q"][r, h * g : (h + 1) * g])


def test_summary_names_the_best():
    pt = {"D": 128, "G": 4, "B": 64, "routing": "uniform", "best": "triton", "bound": "read",
          "floor_fraction": {"triton": 0.9, "flash_tight": 0.5},
          "read_floor_fraction": {"triton": 0.9, "flash_tight": 0.5},
          "ms": {"triton": 1.0, "flash_tight": 1.8}, "vendor_over_triton_time": 1.8}  # fmt: skip
    s = summarize([pt])["D128_G4_B64_uniform"]
    assert s["best"] == "triton" and s["best_ms"] == 1.0 and s["vendor_over_triton_time"] == 1.8
