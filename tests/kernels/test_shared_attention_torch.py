"""The engine's batched PyTorch shared-chunk attention and merge (kernels/shared_attention_torch.py)
equal the kernels' per-selection references on fresh random inputs: fp32 and fp16, e4m3
pools with per-token and per-(chunk, KV head) scales, per-chunk softmax factors, a rotated
K, absent chunks, selections out of order, rows with no state, and no selection at all."""

import pytest
import torch

from moska.kernel_ops import kernel_ops
from moska.kernels.merge import merge_selections_ref
from moska.kernels.selections import Selections, from_topk_ref
from moska.kernels.shared_attention_ref import grouped_shared_attention_ref
from moska.kernels.shared_attention_torch import (
    grouped_shared_attention_torch,
    merge_selections_torch,
)
from moska.kernels.shared_inputs import ChunkTable

B, HKV, G, D, C = 5, 2, 3, 16, 7


def _inputs(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 12, (C,), generator=gen)
    offs = torch.tensor([0, *lens.cumsum(0).tolist()], dtype=torch.int32)
    s = int(offs[-1])
    k = torch.randn(s, HKV, D, generator=gen).to(dtype)
    v = torch.randn(s, HKV, D, generator=gen).to(dtype)
    q = torch.randn(B, HKV * G, D, generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(C, generator=gen)[:4] for _ in range(B * HKV)])
    return gen, q, k, v, offs, from_topk_ref(idx.view(B, HKV, 4), HKV)


def _close(a, b, tol):
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a))
    err = (a[finite] - b[finite]).abs().max() / b[finite].abs().max()
    assert float(err) < tol, float(err)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
def test_attention_equals_the_reference(dtype, tol):
    for seed in range(3):
        _gen, q, k, v, offs, sel = _inputs(seed, dtype)
        ref = grouped_shared_attention_ref(q, k, v, offs, sel, 0.3)
        out = grouped_shared_attention_torch(q, k, v, offs, sel, 0.3)
        for a, b in zip(out, ref):
            _close(a, b, tol)


def test_selections_in_any_order_and_absent_chunks():
    gen, q, k, v, offs, sel = _inputs(3)
    perm = torch.randperm(sel.req.numel(), generator=gen)
    shuffled = Selections(sel.req[perm], sel.kv_head[perm], sel.chunk[perm])
    table = ChunkTable(offs[:-1].clone(), offs[1:].clone())
    table.ends[2] = table.starts[2]  # chunk 2 absent (a tier's miss): o 0, lse -inf
    ref = grouped_shared_attention_ref(q, k, v, table, shuffled, 0.25)
    out = grouped_shared_attention_torch(q, k, v, table, shuffled, 0.25)
    assert bool((out[1][shuffled.chunk == 2] == float("-inf")).all())
    for a, b in zip(out, ref):
        _close(a, b, 1e-5)


@pytest.mark.parametrize("per_token", [True, False])
def test_fp8_scales_chunk_factors_and_rotation(per_token):
    gen, q, k, v, offs, sel = _inputs(4)
    rows = k.shape[0] if per_token else C
    k_sc = torch.rand(rows, HKV, generator=gen) + 0.5
    v_sc = torch.rand(rows, HKV, generator=gen) + 0.5
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    factors = torch.rand(C, generator=gen) + 0.5
    rot = torch.linalg.qr(torch.randn(D, D, generator=gen))[0]
    kw = {"kv_scales": (k_sc, v_sc), "chunk_scales": factors, "q_rotation": rot}
    ref = grouped_shared_attention_ref(q, k8, v8, offs, sel, 0.3, **kw)
    out = grouped_shared_attention_torch(q, k8, v8, offs, sel, 0.3, **kw)
    for a, b in zip(out, ref):
        _close(a, b, 1e-5)
    with pytest.raises(ValueError, match="kv_scales"):
        grouped_shared_attention_torch(q, k8, v8, offs, sel, 0.3)


def test_merge_equals_the_reference_with_empty_states():
    gen, q, k, v, offs, sel = _inputs(5)
    o_sel, lse_sel = grouped_shared_attention_ref(q, k, v, offs, sel, 0.3)
    lse_sel[0] = float("-inf")  # a selection with no keys
    o_base = torch.randn(B, HKV * G, D, generator=gen)
    lse_base = torch.randn(B, HKV * G, generator=gen)
    lse_base[0, 0] = float("-inf")  # a row with no unique keys
    o_base[1, 1] = float("nan")  # a state of no weight may hold anything
    lse_base[1, 1] = float("-inf")
    for base in (lse_base, torch.full_like(lse_base, float("-inf"))):
        ref = merge_selections_ref(o_base, base, o_sel, lse_sel, sel)
        out = merge_selections_torch(o_base, base, o_sel, lse_sel, sel)
        for a, b in zip(out, ref):
            _close(a, b, 1e-5)
        assert not bool(out[0].isnan().any())


def test_no_selection_and_the_engine_table():
    _gen, q, k, v, offs, _sel = _inputs(6)
    none = Selections(*(torch.zeros(0, dtype=torch.int32) for _ in range(3)))
    o, lse = grouped_shared_attention_torch(q, k, v, offs, none, 0.3)
    assert o.shape == (0, G, D) and lse.shape == (0, G)
    o_base, lse_base = torch.randn(B, HKV * G, D), torch.randn(B, HKV * G)
    mo, ml = merge_selections_torch(o_base, lse_base, o, lse, none)
    assert torch.equal(mo, o_base) and torch.equal(ml, lse_base)
    ops = kernel_ops("torch")  # the CPU engine runs these, not the per-selection loops
    assert ops.grouped_shared is grouped_shared_attention_torch
    assert ops.merge_selections is merge_selections_torch
