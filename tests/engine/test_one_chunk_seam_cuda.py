"""The engine's shared attention over a library read whole on the GPU, bf16 (attention/shared.py
through kernels/shared_one_chunk.py; one chunk, or three as one span): whichever backend the
tuning table picks for the shape (Triton at few rows per KV head, cuDNN at many), the merged
output equals the fp32 reference's, eagerly and replayed from a CUDA graph.
`TRITON_INTERPRET=0 python -m pytest -q tests/engine/test_one_chunk_seam_cuda.py`."""

from types import SimpleNamespace

import pytest
import torch

from moska.attention import shared
from moska.attention.metadata import LibraryGroup
from moska.kernel_ops import kernel_ops
from moska.kernels.shared_tuning import one_chunk_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _manifest(offsets: list[int]) -> SimpleNamespace:
    """The manifest fields the shared path reads: chunk starts and the end of the last."""
    chunks = [SimpleNamespace(start=o) for o in offsets[:-1]]
    return SimpleNamespace(chunks=chunks, num_tokens=offsets[-1])


HKV, S, START = 8, 3001, 7  # a partial last key block; the chunk not at the pool's row 0


def _library(d: int, chunks: int):
    k, v = (torch.randn(START + S + 5, HKV, d, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    offsets = [START + S * i // chunks for i in range(chunks + 1)]
    return SimpleNamespace(
        k_pools=[k], v_pools=[v], num_chunks=chunks, tiers=None, kv_scale_pools=None,
        fp8_mma=None,
        chunk_offsets=torch.tensor(offsets, dtype=torch.int32, device="cuda"),
        manifest=_manifest(offsets),
    )  # fmt: skip


def _group(lib, b: int) -> LibraryGroup:
    return LibraryGroup(lib, torch.arange(b, device="cuda"), top_k=4, all_rows=True)


def _step(ops, lib, q, o_base, lse_base, scale):
    group = _group(lib, q.shape[0])
    o_sel, lse_sel, sel = shared.shared_attention_for_group(ops, 0, q, group, scale)
    return ops.merge_selections(o_base, lse_base, o_sel, lse_sel, sel)[0]


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "d,g,b,chunks",
    [(128, 4, 40, 1), (128, 8, 256, 1), (64, 2, 1024, 1), (128, 8, 256, 3), (128, 8, 1024, 1)],
)
def test_library_read_whole_matches_reference_eager_and_in_a_graph(d, g, b, chunks):
    # one chunk, or three read whole (top_k covers them): one span through the dispatcher
    torch.manual_seed(d + g + b)
    lib, scale = _library(d, chunks), d**-0.5
    assert shared.one_chunk_span(kernel_ops("triton"), lib, _group(lib, b)) is not None
    q = torch.randn(b, HKV * g, d, device="cuda", dtype=torch.bfloat16)
    o_base = torch.randn_like(q)
    lse_base = torch.randn(b, HKV * g, device="cuda")
    ref_ops, ops = kernel_ops("torch"), kernel_ops("triton")
    ref = _step(ref_ops, lib, q.float(), o_base.float(), lse_base, scale)
    assert _rel(_step(ops, lib, q, o_base, lse_base, scale), ref) < 1e-2
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _step(ops, lib, q, o_base, lse_base, scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _step(ops, lib, q, o_base, lse_base, scale)
    q.normal_()  # fresh inputs: the replay reads them
    ref = _step(ref_ops, lib, q.float(), o_base.float(), lse_base, scale)
    graph.replay()
    assert _rel(out, ref) < 1e-2, one_chunk_backend(d, g, b * g, q.dtype, "cuda")
