"""router_overlap (#17.3): the GEMM form of the default's scores against the fp32 reference,
and the choice check that the device run reports (it must catch a changed choice and excuse
only rows whose k-th and (k+1)-th scores tie)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch

from moska.bench.router_corun import persistent_stream
from moska.bench.router_overlap import choice_check, chosen_sets, gemm_scores, sel_sets
from moska.bench.router_variants import route_fn
from moska.kernels.router import build_routing_index, route
from moska.kernels.router_ref import keymax_scores_ref


def _index(C=5, L=24, Hkv=2, D=16, rank=4):
    k = torch.randn(C * L, Hkv, D, generator=torch.Generator().manual_seed(1))
    offs = torch.arange(0, C * L + 1, L, dtype=torch.int32)
    return build_routing_index(k, offs, rank)


def test_gemm_scores_equal_the_reference_and_choose_the_same_chunks():
    index = _index()
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(2))
    ref = keymax_scores_ref(q, index.basis, index.lowrank_keys, index.chunk_offsets)
    for block in (1, 2, 5):  # blocks that split the chunks unevenly too
        got = gemm_scores(q, index, block, 24)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert choice_check(chosen_sets(got, 2), ref, 2, 1e-3)["ok"]
    sel = route(q, index, 2, "keymax", per_kv_head=True)
    assert torch.equal(sel_sets(sel, 3, 2, 5), chosen_sets(ref, 2))


def test_choice_check_catches_a_changed_choice_and_excuses_ties():
    ref = torch.tensor([[[5.0, 4.0, 1.0, 0.0]], [[3.0, 2.0, 2.0, 0.0]]])  # row 2 ties at k=2
    right = chosen_sets(ref, 2)
    assert choice_check(right, ref, 2, 1e-3) == {
        "rows": 2, "rows_clear": 1, "clear_rows_equal": 1, "all_rows_equal": 2, "ok": True,
    }  # fmt: skip
    tie_swap = right.clone()
    tie_swap[1, 0] = torch.tensor([True, False, True, False])
    assert choice_check(tie_swap, ref, 2, 1e-3)["ok"]  # the other tied chunk: excused
    wrong = right.clone()
    wrong[0, 0] = torch.tensor([True, False, True, False])  # chunk 2 instead of 1: clear gap
    out = choice_check(wrong, ref, 2, 1e-3)
    assert not out["ok"] and out["clear_rows_equal"] == 0


def test_persistent_stream_reads_every_element_once():
    """The co-run probe's read stream: P programs striding over the tiles (the last one
    ragged) sum to the tensor's sum, for P below and above the tile count."""
    x = torch.randn(4096 * 3 + 100, generator=torch.Generator().manual_seed(3))
    for programs in (1, 2, 5):
        got = persistent_stream(x, programs)()
        assert got.shape == (programs,)
        torch.testing.assert_close(got.sum(), x.sum(), rtol=1e-4, atol=1e-3)


def test_default_variants_choose_the_default_chunks():
    """A capped grid and another key-max tile change no score, so no choice; the tile is
    restored after the call."""
    from moska.kernels import router_dense

    index = _index()
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(4))
    want = sel_sets(route_fn("default", q, index, 2)(), 3, 2, 5)
    for name in ("default_p1", "default_p2_b64w8s3", "default_p1_b16w4s2"):
        assert torch.equal(sel_sets(route_fn(name, q, index, 2)(), 3, 2, 5), want), name
    assert router_dense.TILES_BY_BATCH == ()
