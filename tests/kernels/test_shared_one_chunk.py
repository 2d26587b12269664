"""One chunk read by every KV head of B requests (`shared_one_chunk.py`): both backends (our
grouped kernel in the interpreter, torch's SDPA flash kernel with its LSE on the CPU) give
the plain-PyTorch reference's (o, lse) in the grouped kernel's layout, at every GQA ratio;
the per-shape backend table picks as documented."""

import pytest
import torch
from kernel_util import TOL, rel_err

from moska.kernels import shared_one_chunk
from moska.kernels.shared_attention import grouped_shared_attention_ref
from moska.kernels.shared_one_chunk import one_chunk_attention, one_chunk_selections
from moska.kernels.shared_tuning import OneChunkEntry, one_chunk_backend

HKV, S = 2, 45  # 45 keys: a masked last block, and splits of the chunk


def _problem(b: int, g: int, dtype: torch.dtype, seed: int, d: int = 64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, HKV * g, d, generator=gen).to(dtype)
    k = torch.randn(S, HKV, d, generator=gen).to(dtype)
    v = torch.randn(S, HKV, d, generator=gen).to(dtype)
    return q, k, v


def _reference(q, k, v, b):
    offs = torch.tensor([0, S], dtype=torch.int32)
    return grouped_shared_attention_ref(q, k, v, offs, one_chunk_selections(b, HKV, "cpu"), 0.3)


@pytest.mark.parametrize(
    "d,g,dtype", [(64, 1, torch.float32), (128, 4, torch.float16), (64, 8, torch.float16)]
)
def test_triton_backend_matches_reference(d, g, dtype):
    b = 3
    q, k, v = _problem(b, g, dtype, seed=g, d=d)
    kw = {"block_m": 16, "block_n": 16, "num_stages": 1, "target_programs": 1}
    o, lse = one_chunk_attention(q, k, v, 0.3, backend="triton", **kw)
    ro, rl = _reference(q, k, v, b)
    assert o.shape == (HKV * b, g, d) and o.dtype == dtype
    assert rel_err(o, ro) < TOL[dtype]
    assert rel_err(lse, rl) < 1e-4


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdpa_backend_matches_reference(d, g, dtype):
    # the packing of q into [1, Hkv, B * G, D], the strided K/V views and the unpacking of
    # o and lse back to the grouped layout (CPU flash kernel; cuDNN / CUDA flash on the device)
    b = 5
    q, k, v = _problem(b, g, dtype, seed=10 + g, d=d)
    o, lse = one_chunk_attention(q, k, v, 0.3, backend="flash")
    ro, rl = _reference(q, k, v, b)
    assert o.shape == (HKV * b, g, d) and o.dtype == dtype and lse.dtype == torch.float32
    assert rel_err(o, ro) < TOL[dtype]
    assert rel_err(lse, rl) < (1e-4 if dtype == torch.float32 else 1e-3)


def test_cached_work_list_is_reused_per_shape_and_never_across_chunk_lengths(launches):
    # the second call of a shape launches no planning kernel; a shorter chunk (other split
    # lengths) plans its own, and every call, cached or not, gives the reference
    shared_one_chunk._INPUTS.clear()
    shared_one_chunk._PLANS.clear()
    q, k, v = _problem(4, 2, torch.float32, seed=5, d=16)
    kw = {"block_m": 16, "block_n": 16, "num_stages": 1, "target_programs": 1}
    for n_keys, cache, plans in (
        (S, True, True),
        (S, True, False),
        (30, True, True),
        (S, False, True),
    ):
        launches.clear()
        o, lse = one_chunk_attention(
            q, k[:n_keys], v[:n_keys], 0.3, backend="triton", cache_plan=cache, **kw
        )
        offs = torch.tensor([0, n_keys], dtype=torch.int32)
        ro, rl = grouped_shared_attention_ref(
            q, k[:n_keys], v[:n_keys], offs, one_chunk_selections(4, HKV, "cpu"), 0.3
        )
        assert rel_err(o, ro) < 1e-4 and rel_err(lse, rl) < 1e-4
        assert any(name.startswith("_plan") for name in launches) == plans


def test_table_picks_backend_by_shape_rows_dtype_and_device():
    bf16, f32 = torch.bfloat16, torch.float32
    table = (
        OneChunkEntry(64, 2, 0, "flash"),
        OneChunkEntry(64, 2, 100, "cudnn"),
        OneChunkEntry(64, 8, 0, "triton"),
        OneChunkEntry(64, 8, 50, "cudnn"),
        OneChunkEntry(64, 8, 400, "triton"),  # a measured point where ours won again
    )
    assert one_chunk_backend(64, 2, 99, bf16, "cuda", table) == "flash"
    assert one_chunk_backend(64, 2, 100, bf16, "cuda", table) == "cudnn"
    assert one_chunk_backend(64, 1, 100, bf16, "cuda", table) == "cudnn"  # G 1: G 2's entries
    assert one_chunk_backend(64, 4, 60, bf16, "cuda", table) == "cudnn"  # G 4: G 8's
    assert one_chunk_backend(64, 8, 399, bf16, "cuda", table) == "cudnn"
    assert one_chunk_backend(64, 16, 400, bf16, "cuda", table) == "triton"  # the largest G's
    assert one_chunk_backend(128, 2, 10_000, bf16, "cuda", table) == "triton"  # D not there
    assert one_chunk_backend(64, 2, 100, f32, "cuda", table) == "triton"  # SDPA: 16-bit only
    assert one_chunk_backend(64, 2, 100, bf16, "cpu", table) == "triton"
    # the shipped table: cuDNN for D 128 G 8 from 2,048 rows (session 17), the Gluon kernel
    # for D 128 G 8 from 8,192 and G 4 from 4,096 (session 18), ours for few rows
    assert one_chunk_backend(128, 8, 4096, bf16, "cuda") == "cudnn"
    assert one_chunk_backend(128, 8, 8192, bf16, "cuda") == "gluon"
    assert one_chunk_backend(128, 8, 128, bf16, "cuda") == "triton"
    assert one_chunk_backend(128, 4, 4096, bf16, "cuda") == "gluon"
    assert one_chunk_backend(128, 4, 2048, bf16, "cuda") == "triton"
    assert one_chunk_backend(128, 4, 1024, bf16, "cuda") == "triton"


def test_default_dispatch_on_cpu_runs_triton_and_bad_inputs_say_why():
    q, k, v = _problem(2, 2, torch.float32, seed=3)
    o, lse = one_chunk_attention(q, k, v, 0.3)  # CPU: the table's choice is "triton"
    ro, rl = _reference(q, k, v, 2)
    assert rel_err(o, ro) < 1e-4 and rel_err(lse, rl) < 1e-4
    with pytest.raises(ValueError, match="no keys"):
        one_chunk_attention(q, k[:0], v[:0], 0.3)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        one_chunk_attention(q[:, :3], k, v, 0.3)
    with pytest.raises(ValueError, match="unknown backend"):
        one_chunk_attention(q, k, v, 0.3, backend="xformers")


def test_cache_keeps_its_entries_past_its_cap(monkeypatch):
    # a CUDA graph captured with a cached selections tensor reads it at every replay: a full
    # cache stops adding shapes and never drops (frees) one
    monkeypatch.setattr(shared_one_chunk, "_MAX_CACHED", 2)
    shared_one_chunk._INPUTS.clear()
    cpu = torch.device("cpu")
    kept = [shared_one_chunk._inputs(b, HKV, S, cpu, True)[1] for b in (1, 2)]
    shared_one_chunk._inputs(3, HKV, S, cpu, True)
    assert len(shared_one_chunk._INPUTS) == 2
    again = [shared_one_chunk._inputs(b, HKV, S, cpu, True)[1] for b in (1, 2)]
    assert all(a.req is b.req for a, b in zip(kept, again))
    sel = one_chunk_selections(3, HKV, "cpu")
    assert sel.row_order is not None and sel.row_offsets is not None
    order = sel.row_order.long()
    # row_order groups by (req, kv_head): segment r * Hkv + h holds selection h * B + r
    assert torch.equal(sel.req[order], torch.arange(3).repeat_interleave(HKV).int())
    assert torch.equal(sel.kv_head[order], torch.arange(HKV).repeat(3).int())
    shared_one_chunk._INPUTS.clear()
