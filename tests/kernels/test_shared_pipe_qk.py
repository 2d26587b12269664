"""`pipe_qk`: the grouped kernel's key loop with QK^T one block ahead of the softmax
(`shared_attention_pipe.py`) gives the plain-PyTorch reference's (o, lse), at chunk and split
lengths of no full key block, exactly one (the loop body never runs) and several (with a
masked tail), with and without split-KV; e4m3 pools are refused before any launch."""

import pytest
import torch
from kernel_util import TOL, rel_err

from moska.kernels.selections import Selections
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref

HKV, D, B = 2, 16, 6
LENS = [10, 16, 75]  # block_n 16: 0 full blocks, exactly 1, 4 + a masked tail of 11


def _problem(g: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    offs = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32)
    triples = sorted(
        (c, h, r)
        for c in range(len(LENS))
        for h in range(HKV)
        for r in range(B)
        if torch.rand((), generator=gen) < 0.6 or c == 2
    )
    t = torch.tensor(triples, dtype=torch.int32)
    sel = Selections(t[:, 2].contiguous(), t[:, 1].contiguous(), t[:, 0].contiguous())
    q = torch.randn(B, HKV * g, D, generator=gen).to(dtype)
    k = torch.randn(sum(LENS), HKV, D, generator=gen).to(dtype)
    v = torch.randn(sum(LENS), HKV, D, generator=gen).to(dtype)
    return q, k, v, offs, sel


@pytest.mark.parametrize("g,dtype,split", [(2, torch.float32, True), (4, torch.float16, False)])
def test_pipe_qk_matches_reference(g, dtype, split):
    q, k, v, offs, sel = _problem(g, dtype, seed=g)
    n = sel.req.numel()
    o = torch.full((n, g, D), float("nan"), dtype=dtype)  # poison: every row is written
    lse = torch.full((n, g), float("nan"))
    kw = {"block_m": 16, "block_n": 16, "num_stages": 1, "use_tma": False, "pipe_qk": True}
    kw |= {"target_programs": 16, "min_split": 32} if split else {"target_programs": 1}
    grouped_shared_attention(q, k, v, offs, sel, 0.25, out=(o, lse), **kw)
    ro, rl = grouped_shared_attention_ref(q, k, v, offs, sel, 0.25)
    assert rel_err(o, ro) < TOL[dtype]
    assert rel_err(lse, rl) < 1e-4


def test_pipe_qk_refuses_e4m3_pools():
    q, k, v, offs, sel = _problem(2, torch.float32, seed=0)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    scales = (torch.ones(len(LENS), HKV), torch.ones(len(LENS), HKV))
    with pytest.raises(ValueError, match="pipe_qk"):
        grouped_shared_attention(q, k8, v8, offs, sel, 0.25, kv_scales=scales, pipe_qk=True)
