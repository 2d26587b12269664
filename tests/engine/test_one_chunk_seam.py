"""Every row reading all of a library in the engine's shared attention (attention/shared.py):
a library of one chunk, or top_k covering every chunk of several, runs with the Triton
kernels through the one-chunk dispatcher (kernels/shared_one_chunk.py, no routing launch),
and the merged output equals the plain-PyTorch reference; with the dispatcher off (the
grouped path over every chunk) it equals it too; a step that records its routing still
reports every chunk. Routed rows (top_k below the chunks), FP8 pools and the PyTorch kernels
keep the grouped path."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run on CPU here

from types import SimpleNamespace

import pytest
import torch

from moska.attention import shared
from moska.attention.metadata import LibraryGroup
from moska.kernel_ops import kernel_ops
from moska.kernels import shared_one_chunk


def _manifest(offsets: list[int]) -> SimpleNamespace:
    """The manifest fields the shared path reads: chunk starts and the end of the last."""
    chunks = [SimpleNamespace(start=o) for o in offsets[:-1]]
    return SimpleNamespace(chunks=chunks, num_tokens=offsets[-1])


HKV, D = 2, 32


def _library(dtype, offsets: list[int], pool_rows: int, gen: torch.Generator):
    """A resident library's fields the shared path reads (one layer): chunks at `offsets`
    inside a pool of `pool_rows` rows (a view of a larger pool, as in the arena)."""
    k, v = (torch.randn(pool_rows, HKV, D, generator=gen).to(dtype) for _ in range(2))
    return SimpleNamespace(
        k_pools=[k],
        v_pools=[v],
        chunk_offsets=torch.tensor(offsets, dtype=torch.int32),
        manifest=_manifest(offsets),
        num_chunks=len(offsets) - 1,
        tiers=None,
        kv_scale_pools=None,
        fp8_mma=None,
    )


def _merged(ops, lib, q, o_base, lse_base, scale, record=False):
    """The step's output for rows that read all of `lib`: shared states merged into theirs."""
    group = LibraryGroup(lib, torch.arange(q.shape[0]), top_k=8, all_rows=True, record=record)
    o_sel, lse_sel, sel = shared.shared_attention_for_group(ops, 0, q, group, scale)
    return ops.merge_selections(o_base, lse_base, o_sel, lse_sel, sel)[0]


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = shared_one_chunk.one_chunk_attention

    def counted(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(shared_one_chunk, "one_chunk_attention", counted)
    return calls


@pytest.mark.parametrize("g,dtype", [(1, torch.float32), (4, torch.float16)])
def test_one_chunk_library_takes_the_dispatcher_and_matches_the_reference(g, dtype, spy):
    gen = torch.Generator().manual_seed(g)
    lib = _library(dtype, [3, 40], 44, gen)  # one ragged chunk, not at row 0
    b, scale = 3, 0.3
    q = torch.randn(b, HKV * g, D, generator=gen).to(dtype)
    o_base = torch.randn(b, HKV * g, D, generator=gen).to(dtype)
    lse_base = torch.randn(b, HKV * g, generator=gen)
    ref = _merged(kernel_ops("torch"), lib, q.float(), o_base.float(), lse_base, scale)
    assert not spy  # the PyTorch kernels keep their reference path
    tri = kernel_ops("triton")
    out = _merged(tri, lib, q, o_base, lse_base, scale)
    assert spy == [q.shape]  # one dispatcher call, no routing
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert (out.double() - ref.double()).norm() / ref.double().norm() < tol
    # the dispatcher off: the grouped kernel over the routed selections gives the same
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shared, "one_chunk_span", lambda ops, lib, group: None)
        grouped = _merged(tri, lib, q, o_base, lse_base, scale)
    assert len(spy) == 1
    assert (grouped.double() - ref.double()).norm() / ref.double().norm() < tol


def test_several_chunks_read_whole_take_it_unless_routed(spy):
    gen = torch.Generator().manual_seed(5)
    lib = _library(torch.float32, [0, 20, 37], 37, gen)
    tri, ref_ops = kernel_ops("triton"), kernel_ops("torch")
    rows = torch.arange(2)
    every = LibraryGroup(lib, rows, top_k=2, all_rows=True, record=True)
    assert shared.one_chunk_span(tri, lib, every) == (0, 37)
    assert shared.one_chunk_span(tri, lib, LibraryGroup(lib, rows, top_k=1)) is None  # routed
    assert shared.one_chunk_span(ref_ops, lib, every) is None
    fp8_like = _library(torch.float32, [0, 9], 9, gen)
    fp8_like.kv_scale_pools = [object()]
    assert shared.one_chunk_span(tri, fp8_like, every) is None
    q = torch.randn(2, HKV, D, generator=gen)
    o_base, lse_base = torch.randn(2, HKV, D, generator=gen), torch.randn(2, HKV, generator=gen)
    ref = _merged(ref_ops, lib, q, o_base, lse_base, 0.2)
    whole = _merged(tri, lib, q, o_base, lse_base, 0.2, record=True)
    assert spy == [q.shape]
    # a recording step reports every chunk for every (row, KV head), as routing would
    _, _, sel = shared.shared_attention_for_group(tri, 0, q, every, 0.2)
    rep = shared.reported_selections(tri, 0, q, every, sel)
    cells = set(zip(rep.req.tolist(), rep.kv_head.tolist(), rep.chunk.tolist()))
    assert cells == {(r, h, c) for r in range(2) for h in range(HKV) for c in range(2)}
    with pytest.MonkeyPatch.context() as mp:  # the grouped path over both chunks
        mp.setattr(shared, "one_chunk_span", lambda ops, lib, group: None)
        per_chunk = _merged(tri, lib, q, o_base, lse_base, 0.2)
        assert shared.reported_selections(tri, 0, q, every, sel) is sel
    for out in (whole, per_chunk):
        assert (out - ref).norm() / ref.norm() < 1e-4
