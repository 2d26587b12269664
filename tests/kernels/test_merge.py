import pytest
import torch
from kernel_util import TOL, rel_err

from moska.kernels.merge import (
    merge_selections,
    merge_selections_ref,
    merge_splits,
    merge_states,
    merge_states_ref,
)
from moska.kernels.selections import Selections

INF = float("-inf")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
def test_merge_states(dtype, d):
    o_a, o_b = torch.randn(3, 5, d, dtype=dtype), torch.randn(3, 5, d, dtype=dtype)
    lse_a, lse_b = torch.randn(3, 5) * 3, torch.randn(3, 5) * 3
    lse_a[0, 0] = INF  # one side empty
    o_a[0, 0] = 0
    lse_a[1, 1] = lse_b[1, 1] = INF  # both empty
    o_a[1, 1] = o_b[1, 1] = 0
    o, lse = merge_states(o_a, lse_a, o_b, lse_b)
    ro, rl = merge_states_ref(o_a, lse_a, o_b, lse_b)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert rel_err(o, ro) < TOL[dtype]
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    fin = torch.isfinite(rl)
    assert torch.allclose(lse[fin], rl[fin], atol=1e-5)
    assert torch.equal(o[1, 1], torch.zeros(d, dtype=dtype))


def test_merge_states_exact_split():
    # Attention over keys A ++ B equals the merge of attention over A and over B.
    q, k, v = torch.randn(4, 64), torch.randn(50, 64), torch.randn(50, 64)
    s = q @ k.T

    def attn(sl):
        return torch.softmax(s[:, sl], -1) @ v[sl], torch.logsumexp(s[:, sl], -1)

    o, lse = merge_states(*attn(slice(0, 17)), *attn(slice(17, 50)))
    ro, rl = attn(slice(0, 50))
    assert rel_err(o, ro) < 1e-5 and rel_err(lse, rl) < 1e-5


def test_merge_splits_with_empty():
    o_part = torch.randn(3, 70, 64)
    lse_part = torch.randn(3, 70)
    lse_part[1, :10] = INF
    lse_part[:, 20] = INF  # all splits empty: (0, -inf)
    o_part[1, :10] = float("nan")  # an empty partial's o is never read
    o, lse = merge_splits(o_part, lse_part, torch.float32)
    ro, rl = merge_states_ref(o_part[0], lse_part[0], o_part[2], lse_part[2])
    ro, rl = merge_states_ref(ro, rl, torch.nan_to_num(o_part[1]), lse_part[1])
    assert rel_err(o, ro) < 1e-5
    assert lse[20] == INF and torch.all(o[20] == 0)


@pytest.mark.parametrize("num_splits", [1, 5, 37])
def test_merge_splits_many(num_splits):
    # 37 splits take two load rounds of 32; some partials and one whole row are empty
    o_part = torch.randn(num_splits, 9, 64)
    lse_part = torch.randn(num_splits, 9) * 4
    lse_part[num_splits // 2, 2] = INF
    o_part[num_splits // 2, 2] = float("nan")
    lse_part[:, 7] = INF
    o, lse = merge_splits(o_part, lse_part, torch.float16)
    w = torch.softmax(lse_part, dim=0).nan_to_num(0.0)  # row 7: all -inf
    ro = (w[..., None] * o_part.nan_to_num(0.0)).sum(0)
    rl = torch.logsumexp(lse_part, dim=0)
    assert o.dtype == torch.float16 and lse.dtype == torch.float32
    assert rel_err(o.float(), ro) < TOL[torch.float16]
    fin = torch.isfinite(rl)
    assert torch.allclose(lse[fin], rl[fin], atol=1e-5)
    assert lse[7] == INF and torch.all(o[7] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("g", [1, 3, 4])
def test_merge_selections(dtype, g):
    b, hkv, c, d = 4, 2, 5, 64
    trip = sorted(
        {
            (ci, h, r)
            for ci in range(c)
            for h in range(hkv)
            for r in range(b - 1)
            if torch.rand(()) < 0.5
        }
    )  # request b-1 has no selections
    t = torch.tensor(trip, dtype=torch.int32).reshape(-1, 3)
    sel = Selections(t[:, 2].contiguous(), t[:, 1].contiguous(), t[:, 0].contiguous())
    n = len(trip)
    o_base = torch.randn(b, hkv * g, d, dtype=dtype)
    lse_base = torch.randn(b, hkv * g)
    lse_base[0, 0] = INF  # empty base
    o_base[0, 0] = 0
    o_sel, lse_sel = torch.randn(n, g, d, dtype=dtype), torch.randn(n, g)
    o, lse = merge_selections(o_base, lse_base, o_sel, lse_sel, sel)
    ro, rl = merge_selections_ref(o_base, lse_base, o_sel, lse_sel, sel)
    assert rel_err(o, ro) < TOL[dtype]
    assert rel_err(lse, rl) < 1e-5
    assert torch.equal(o[b - 1], o_base[b - 1])


def test_merge_selections_empty_and_all_inf():
    b, hq, d = 2, 4, 64
    o_base = torch.zeros(b, hq, d)
    lse_base = torch.full((b, hq), INF)
    e = torch.zeros(0, dtype=torch.int32)
    o, lse = merge_selections(
        o_base, lse_base, torch.zeros(0, 2, d), torch.zeros(0, 2), Selections(e, e, e)
    )
    assert torch.all(o == 0) and torch.all(lse == INF)


def test_merge_rejects_bad_input():
    with pytest.raises(ValueError):
        merge_states(
            torch.randn(2, 64), torch.randn(2).double(), torch.randn(2, 64), torch.randn(2)
        )
    with pytest.raises(ValueError):
        merge_states(torch.randn(2, 64), torch.randn(2), torch.randn(3, 64), torch.randn(3))
