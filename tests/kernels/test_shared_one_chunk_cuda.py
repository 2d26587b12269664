"""One chunk read by many requests on the GPU, bf16: every backend of `one_chunk_attention`
(compiled Triton, cuDNN and flash through torch with their LSE, the Gluon kernel on Hopper
and the table's dispatch)
gives the fp32 reference's (o, lse), eagerly and replayed from a CUDA graph.
`TRITON_INTERPRET=0 python -m pytest -q tests/kernels/test_shared_one_chunk_cuda.py`."""

import pytest
import torch
from kernel_util import rel_err

from moska.kernels.shared_one_chunk import one_chunk_attention
from moska.kernels.shared_tuning import one_chunk_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
HKV, S = 8, 3001  # a partial last key block


def _reference(q, k, v, scale):
    b, hq, d = q.shape
    g = hq // HKV
    qh = q.float().view(b, HKV, g, d).permute(1, 0, 2, 3)  # [Hkv, B, G, D]
    s = torch.einsum("hbgd,shd->hbgs", qh, k.float()) * scale
    o = torch.einsum("hbgs,shd->hbgd", s.softmax(-1), v.float())
    return o.reshape(HKV * b, g, d), torch.logsumexp(s, -1).reshape(HKV * b, g)


@pytest.mark.parametrize(
    "d,g,b", [(64, 1, 24), (128, 4, 40), (128, 8, 256), (64, 8, 1024), (128, 8, 1024)]
)
@pytest.mark.parametrize("backend", ["triton", "cudnn", "flash", "gluon", None])
def test_backends_match_reference_eager_and_in_a_graph(d, g, b, backend):
    torch.manual_seed(d + g + b)
    q = torch.randn(b, HKV * g, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(S, HKV, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ro, rl = _reference(q, k, v, d**-0.5)
    o, lse = one_chunk_attention(q, k, v, d**-0.5, backend=backend)
    assert rel_err(o, ro) < 1e-2 and rel_err(lse, rl) < 1e-2
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        one_chunk_attention(q, k, v, d**-0.5, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        og, lg = one_chunk_attention(q, k, v, d**-0.5, backend=backend)
    q.normal_()  # fresh inputs: the replay must read them, not the captured values
    ro, rl = _reference(q, k, v, d**-0.5)
    graph.replay()
    assert rel_err(og, ro) < 1e-2 and rel_err(lg, rl) < 1e-2


def test_table_sends_many_rows_to_an_sdpa_backend():
    assert one_chunk_backend(128, 8, 8 * 1024, torch.bfloat16, "cuda") != "triton"
    assert one_chunk_backend(128, 8, 16, torch.bfloat16, "cuda") == "triton"
