"""CPU checks of the Gluon one-chunk kernel's host side (the kernel itself runs on Hopper
only: `python -m moska.bench.kernels_gluon` checks it there against the fp32 reference)."""

import pytest
import torch

from moska.kernels.gluon_one_chunk import gluon_ok, gluon_one_chunk, split_plan


@pytest.mark.parametrize(
    ("m", "s", "bm", "bn", "target", "min_split"),
    [(64, 131072, 64, 64, 264, 1024), (8192, 131072, 128, 128, 132, 1024),
     (20, 4136, 64, 128, 512, 1024), (16, 100, 64, 128, 264, 1024), (128, 131072, 128, 64, 264, 512)],
)  # fmt: skip
def test_split_plan_covers_every_key_once(m, s, bm, bn, target, min_split):
    n, split_len = split_plan(m, 8, s, bm, bn, target, min_split)
    assert split_len % bn == 0 and n >= 1
    starts = [i * split_len for i in range(n)]
    assert all(st < s for st in starts), "no split may be empty (its program would wait forever)"
    assert starts[-1] + split_len >= s, "the splits must reach the chunk's end"
    if n > 1:
        assert split_len >= min(min_split, s) - bn  # rounded to whole key blocks


def test_split_plan_fills_the_gpu_at_few_rows_only():
    few, _ = split_plan(64, 8, 131072, 64, 64, 264, 1024)
    many, _ = split_plan(8192, 8, 131072, 128, 128, 132, 1024)
    assert few * 8 >= 264 and many == 1


def test_gluon_refuses_cpu_inputs():
    q = torch.randn(2, 8, 64)
    k = v = torch.randn(100, 2, 64)
    assert not gluon_ok(q, k, v)
    with pytest.raises(ValueError, match="Hopper"):
        gluon_one_chunk(q, k, v, 0.125)


def test_dispatch_to_gluon_runs_the_triton_kernel_off_hopper():
    # backend "gluon" where Gluon cannot run (the CPU here) takes the Triton path: the same
    # (o, lse) as backend "triton", both the reference's
    from moska.kernels.shared_attention import grouped_shared_attention_ref
    from moska.kernels.shared_one_chunk import one_chunk_attention, one_chunk_selections

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 8, 16, generator=gen)
    k, v = (torch.randn(40, 2, 16, generator=gen) for _ in range(2))
    o, lse = one_chunk_attention(q, k, v, 0.25, backend="gluon")
    ot, lt = one_chunk_attention(q, k, v, 0.25, backend="triton")
    offs = torch.tensor([0, 40], dtype=torch.int32)
    ro, rl = grouped_shared_attention_ref(q, k, v, offs, one_chunk_selections(3, 2, "cpu"), 0.25)
    assert torch.equal(o, ot) and torch.equal(lse, lt)
    assert (o - ro).norm() / ro.norm() < 1e-4 and (lse - rl).norm() / rl.norm() < 1e-4


@pytest.mark.parametrize(
    ("version", "flag", "used"),
    [("3.6.0", "", True), ("3.9.0", "", False), ("3.9.0", "1", True), ("3.6.0", "0", False)],
)
def test_dispatcher_takes_gluon_only_on_the_triton_it_was_timed_with(
    monkeypatch, version, flag, used
):
    # Gluon's API moves between Triton releases: another release (or MOSKA_GLUON=0) leaves
    # the table's Gluon points to cuDNN / Triton instead of failing at the first call
    from moska.kernels import shared_one_chunk

    monkeypatch.setattr(shared_one_chunk.triton, "__version__", version)
    monkeypatch.setenv("MOSKA_GLUON", flag)
    shared_one_chunk.gluon_module.cache_clear()
    try:
        got = shared_one_chunk.gluon_module()
        assert (got is not None) == used
        if used:
            assert got.gluon_one_chunk is gluon_one_chunk
    finally:
        shared_one_chunk.gluon_module.cache_clear()
