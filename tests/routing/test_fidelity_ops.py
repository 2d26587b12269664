"""The fidelity benchmark's batched CPU attention equals the kernels' references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from moska.bench.fidelity_ops import grouped_shared_by_chunk, merge_selections_scatter
from moska.kernels.merge import merge_selections_ref
from moska.kernels.selections import from_topk_ref
from moska.kernels.shared_attention import grouped_shared_attention_ref


def test_batched_attention_and_merge_equal_the_references():
    gen = torch.Generator().manual_seed(0)
    B, Hkv, G, D, C = 5, 2, 3, 16, 6
    lens = torch.randint(1, 12, (C,), generator=gen)
    offs = torch.tensor([0, *lens.cumsum(0).tolist()], dtype=torch.int32)
    k = torch.randn(int(offs[-1]), Hkv, D, generator=gen)
    v = torch.randn(int(offs[-1]), Hkv, D, generator=gen)
    q = torch.randn(B, Hkv * G, D, generator=gen)
    idx = torch.stack([torch.randperm(C, generator=gen)[:3] for _ in range(B * Hkv)])
    sel = from_topk_ref(idx.view(B, Hkv, 3), Hkv)
    o_ref, lse_ref = grouped_shared_attention_ref(q, k, v, offs, sel, 0.3)
    o, lse = grouped_shared_by_chunk(q, k, v, offs, sel, 0.3)
    assert torch.allclose(o, o_ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(lse, lse_ref, rtol=1e-4, atol=1e-5)
    o_base = torch.randn(B, Hkv * G, D, generator=gen)
    lse_base = torch.randn(B, Hkv * G, generator=gen)
    lse_base[0, 0] = float("-inf")  # a row with no unique keys
    m_ref = merge_selections_ref(o_base, lse_base, o_ref, lse_ref, sel)
    m = merge_selections_scatter(o_base, lse_base, o_ref, lse_ref, sel)
    for a, b in zip(m, m_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
