"""`half_tail`: a group's last row tile of at most block_m / 2 rows runs a half-height tile
(less row padding at large B). Its rows, its split partials (stored at the full tile's
stride) and its merge must match the plain-PyTorch reference like the full-height path."""

import pytest
import torch
from kernel_util import TOL, rel_err

from moska.kernels.selections import Selections
from moska.kernels.shared_attention import grouped_shared_attention, grouped_shared_attention_ref

# G = 2, block_m = 32 (half 16): chunk 0 / head 0 is read by 11 requests (22 rows: one tail
# tile of 22 > 16, full height), chunk 0 / head 1 by 20 (40 rows: a full tile, then a tail of
# 8 <= 16, half height), chunk 1 / head 0 by 3 (6 rows, half height); chunk 1 is 150 keys,
# split along the sequence (min_split 32) so that half-height tiles also write partials.
G, HKV, D, B = 2, 2, 32, 20
LENS = [70, 150]
READERS = {(0, 0): 11, (0, 1): 20, (1, 0): 3, (1, 1): 17}


def _problem(dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    offs = torch.tensor([0, LENS[0], sum(LENS)], dtype=torch.int32)
    triples = sorted(
        (c, h, int(r))
        for (c, h), n in READERS.items()
        for r in torch.randperm(B, generator=gen)[:n]
    )
    t = torch.tensor(triples, dtype=torch.int32)
    sel = Selections(t[:, 2].contiguous(), t[:, 1].contiguous(), t[:, 0].contiguous())
    q = torch.randn(B, HKV * G, D, generator=gen).to(dtype)
    k = torch.randn(sum(LENS), HKV, D, generator=gen).to(dtype)
    v = torch.randn(sum(LENS), HKV, D, generator=gen).to(dtype)
    return q, k, v, offs, sel


@pytest.mark.parametrize("dtype,split", [(torch.float32, True), (torch.float16, False)])
def test_half_tail_matches_reference(dtype, split):
    q, k, v, offs, sel = _problem(dtype, seed=7 + split)
    scale = D**-0.5
    n = sel.req.numel()
    o = torch.full((n, G, D), float("nan"), dtype=dtype)  # poison: every row is written
    lse = torch.full((n, G), float("nan"))
    kw = {"block_m": 32, "block_n": 32, "num_stages": 1, "half_tail": True}
    kw |= {"target_programs": 24, "min_split": 32} if split else {"target_programs": 1}
    grouped_shared_attention(q, k, v, offs, sel, scale, out=(o, lse), **kw)
    ro, rl = grouped_shared_attention_ref(q, k, v, offs, sel, scale)
    assert rel_err(o, ro) < TOL[dtype]
    assert rel_err(lse, rl) < 1e-4
