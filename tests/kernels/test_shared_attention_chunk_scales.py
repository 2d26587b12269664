"""Per-chunk softmax scales of the grouped shared-chunk attention (`chunk_scales` [C] fp32):
chunks of parts with other softmax temperatures (APE-tempered libraries) share one launch."""

import pytest
import torch
from kernel_util import TOL, rel_err

from moska.kernels.selections import Selections
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref
from moska.kernels.shared_inputs import ChunkTable

# small tiles and splits: row tiles that end inside a request and split-KV in few programs
SMALL = {"block_m": 16, "block_n": 32, "target_programs": 6, "min_split": 32}


def _selections(triples):
    t = torch.tensor(sorted(set(triples)), dtype=torch.int32).reshape(-1, 3)  # (chunk, kv, req)
    return Selections(t[:, 2].contiguous(), t[:, 1].contiguous(), t[:, 0].contiguous())


def _inputs(dtype, lens, b=3, hkv=2, g=2, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = sum(lens)
    q = torch.randn(b, hkv * g, d, generator=gen).to(dtype)
    k = torch.randn(s, hkv, d, generator=gen).to(dtype)
    v = torch.randn(s, hkv, d, generator=gen).to(dtype)
    offs = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    factors = (0.5 + 1.5 * torch.rand(len(lens), generator=gen)).float()  # 0.5 .. 2
    triples = [(c, h, r) for c in range(len(lens)) for h in range(hkv) for r in range(b)]
    return q, k, v, offs, _selections(triples), factors


def _run(q, k, v, table, sel, scale, **kw):
    n, g, d = sel.req.numel(), q.shape[1] // k.shape[1], q.shape[2]
    o = torch.full((n, g, d), float("nan"), dtype=q.dtype)  # poison: every element is written
    lse = torch.full((n, g), float("nan"))
    return grouped_shared_attention(q, k, v, table, sel, scale, out=(o, lse), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("persistent", [False, True])
def test_random_chunk_scales_equal_reference(dtype, persistent):
    """Random factors per chunk (ragged chunks, a long one split along the sequence): the
    kernel equals the reference, which scales each chunk's scores on its own; the states
    differ from one scale for all (the factors are used)."""
    q, k, v, offs, sel, factors = _inputs(dtype, [70, 9, 33])
    scale = q.shape[-1] ** -0.5
    kw = {"max_programs": 2} if persistent else {}
    o, lse = _run(q, k, v, offs, sel, scale, chunk_scales=factors, **SMALL, **kw)
    ro, rl = grouped_shared_attention_ref(q, k, v, offs, sel, scale, chunk_scales=factors)
    assert rel_err(o, ro) < TOL[dtype] and rel_err(lse, rl) < TOL[dtype]
    for c, f in enumerate(factors.tolist()):  # chunk by chunk: the plain sm_scale x factor
        rows = sel.chunk == c
        one = torch.where(rows)[0]
        want_o, want_l = grouped_shared_attention_ref(
            q, k, v, offs, Selections(sel.req[one], sel.kv_head[one], sel.chunk[one]), scale * f
        )
        assert rel_err(o[rows], want_o) < TOL[dtype] and rel_err(lse[rows], want_l) < TOL[dtype]
    plain, _ = grouped_shared_attention_ref(q, k, v, offs, sel, scale)
    assert rel_err(o, plain) > 10 * TOL[dtype]


def test_slot_table_with_absent_chunk():
    """A ChunkTable (rows moved, one chunk absent) with per-chunk factors: the absent chunk
    gives (0, -inf), the others equal the reference."""
    q, k, v, _, sel, factors = _inputs(torch.float32, [20, 40, 12], seed=1)
    starts = torch.tensor([40, 0, 60], dtype=torch.int32)  # chunk 1 at rows 0:40, 0 at 40:60
    table = ChunkTable(starts, torch.tensor([60, 40, 60], dtype=torch.int32))  # 2 absent
    o, lse = _run(q, k, v, table, sel, 0.125, chunk_scales=factors, **SMALL)
    ro, rl = grouped_shared_attention_ref(q, k, v, table, sel, 0.125, chunk_scales=factors)
    absent = sel.chunk == 2
    assert (o[absent] == 0).all() and torch.isinf(lse[absent]).all()
    assert rel_err(o[~absent], ro[~absent]) < 1e-4 and rel_err(lse[~absent], rl[~absent]) < 1e-4


def test_rejects_bad_chunk_scales():
    q, k, v, offs, sel, factors = _inputs(torch.float32, [8, 8])
    for bad, match in (
        (factors.double(), "float32"),
        (factors[:1], r"\[C\] = \[2\]"),
        (torch.rand(2, 2)[:, 0], "contiguous"),
    ):
        with pytest.raises(ValueError, match=match):
            grouped_shared_attention(q, k, v, offs, sel, 0.1, chunk_scales=bad)
        with pytest.raises(ValueError, match=match):
            grouped_shared_attention_ref(q, k, v, offs, sel, 0.1, chunk_scales=bad)
