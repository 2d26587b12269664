"""On CUDA, compiled, bf16: the grouped shared kernel and paged decode over pools of more
than 2^31 elements, with chunks (blocks) straddling flat element 2^31 and at the very end,
where an int32 offset would wrap. A 1M-token library at Hkv 8 / D 128 is 2^30 elements
per pool, so two such libraries in one pool, or a longer one, get there.

Not in tests/kernels/ (whose conftest forces the interpreter). GPU machine only:
`TRITON_INTERPRET=0 python -m pytest -q tests/test_kernels_large_pool_cuda.py` (~17 GB of
GPU memory, a few seconds)."""

import pytest
import torch

from moska.kernels.paged_attention import paged_attention_ref, paged_decode_attention
from moska.kernels.selections import Selections
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref
from moska.kernels.shared_inputs import ChunkTable

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEV, BF16 = "cuda", torch.bfloat16
HKV, D, G, B = 8, 128, 4, 16
ROW = HKV * D  # elements per pool row (token)
EDGE = (1 << 31) // ROW  # the first row at or past flat element 2^31


def _rel(a, b):
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def pools():
    """K and V pools of EDGE + 6,000 rows (> 2^31 elements each, ~4.3 GB): random where a
    chunk reads, uninitialised elsewhere. Chunks: one straddling row EDGE, one far past it,
    one ending at the pool's last row (ragged, so the last block runs off the end)."""
    torch.manual_seed(0)
    s = EDGE + 6000
    k = torch.empty(s, HKV, D, device=DEV, dtype=BF16)
    v = torch.empty_like(k)
    spans = [(EDGE - 1000, EDGE + 3096), (EDGE + 3500, EDGE + 4100), (s - 1377, s)]
    for lo, hi in spans:
        k[lo:hi].normal_()
        v[lo:hi].normal_()
    assert k.numel() > 2**31
    starts = torch.tensor([a for a, _ in spans], dtype=torch.int32, device=DEV)
    ends = torch.tensor([b for _, b in spans], dtype=torch.int32, device=DEV)
    yield k, v, ChunkTable(starts, ends)
    del k, v
    torch.cuda.empty_cache()


@pytest.mark.parametrize("use_tma", [False, True])
def test_grouped_past_2_31(pools, use_tma):
    k, v, table = pools
    c = table.starts.numel()
    q = torch.randn(B, HKV * G, D, device=DEV, dtype=BF16)
    key = torch.arange(c * HKV * B, device=DEV, dtype=torch.int32)  # every (chunk, head, req)
    sel = Selections(key % B, (key // B) % HKV, key // (B * HKV))
    o, lse = grouped_shared_attention(q, k, v, table, sel, D**-0.5, use_tma=use_tma)
    ro, rl = grouped_shared_attention_ref(q, k, v, table, sel, D**-0.5)
    assert _rel(o, ro) < 1e-2 and _rel(lse, rl) < 1e-3


def test_paged_decode_past_2_31():
    """A paged cache of > 2^31 elements: the sequences' blocks shuffled among the 64
    blocks either side of flat element 2^31."""
    torch.manual_seed(1)
    bs = 16
    edge_block = (1 << 31) // (bs * ROW)
    nb = edge_block + 64
    k = torch.empty(nb, bs, HKV, D, device=DEV, dtype=BF16)
    v = torch.empty_like(k)
    k[edge_block - 64 :].normal_()
    v[edge_block - 64 :].normal_()
    assert k.numel() > 2**31
    seq = [700, 33, 1000]
    need = [-(-n // bs) for n in seq]
    perm = torch.randperm(128, device=DEV).int() + (edge_block - 64)
    bt = torch.zeros(len(seq), max(need), dtype=torch.int32, device=DEV)
    i = 0
    for r, n in enumerate(need):
        bt[r, :n] = perm[i : i + n]
        i += n
    sl = torch.tensor(seq, dtype=torch.int32, device=DEV)
    q = torch.randn(len(seq), HKV * G, D, device=DEV, dtype=BF16)
    o, lse = paged_decode_attention(q, k, v, bt, sl, D**-0.5)
    cu = torch.arange(len(seq) + 1, dtype=torch.int32, device=DEV)
    ro, rl = paged_attention_ref(q, k, v, bt, cu, sl, D**-0.5)
    assert _rel(o, ro) < 1e-2 and _rel(lse, rl) < 1e-3
