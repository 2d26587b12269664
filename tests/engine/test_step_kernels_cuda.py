"""On CUDA, compiled (not interpreted) in bf16: the kernels a decode step runs around the
matrix products, against their PyTorch references on fresh random inputs. Paged decode
runs with a block table as wide as a CUDA graph's (most splits empty), so the merge of
33 split states is the one a B = 1 graph step uses."""

import pytest
import torch

from moska.kernels.kv_write import kv_write, kv_write_ref
from moska.kernels.merge import merge_splits
from moska.kernels.paged_attention import paged_attention_ref, paged_decode_attention
from moska.kernels.rotary import rotary_inplace, rotary_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEV, BF16 = "cuda", torch.bfloat16


def _rel(a, b):
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("seq", [[600], [5, 4100, 130000]])
def test_paged_decode_wide_table_bf16(seq):
    torch.manual_seed(len(seq))
    hkv, g, d, bs = 8, 4, 128, 16
    width = 131072 // bs  # a graph's table: the longest context the model allows
    need = [-(-s // bs) for s in seq]
    k = torch.randn(sum(need) + 1, bs, hkv, d, device=DEV, dtype=BF16)
    v = torch.randn_like(k)
    perm = torch.randperm(sum(need), device=DEV).int()
    bt = torch.full((len(seq), width), sum(need), dtype=torch.int32, device=DEV)
    i = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[i : i + n]
        i += n
    sl = torch.tensor(seq, dtype=torch.int32, device=DEV)
    q = torch.randn(len(seq), hkv * g, d, device=DEV, dtype=BF16)
    o, lse = paged_decode_attention(q, k, v, bt, sl, d**-0.5)
    cu = torch.arange(len(seq) + 1, dtype=torch.int32, device=DEV)
    ro, rl = paged_attention_ref(q.float(), k.float(), v.float(), bt, cu, sl, d**-0.5)
    assert _rel(o, ro) < 1e-2 and _rel(lse, rl) < 1e-4


def test_merge_splits_bf16():
    torch.manual_seed(1)
    o_part = torch.randn(37, 300, 128, device=DEV)
    lse_part = torch.randn(37, 300, device=DEV) * 5
    lse_part[3:30, :50] = float("-inf")
    o, lse = merge_splits(o_part, lse_part, BF16)
    w = torch.softmax(lse_part, dim=0)
    assert _rel(o, (w[..., None] * o_part).sum(0)) < 1e-2
    assert _rel(lse, torch.logsumexp(lse_part, dim=0)) < 1e-5


def test_rotary_and_kv_write_bf16():
    torch.manual_seed(2)
    t, hq, hkv, d = 7, 32, 8, 128
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEV, dtype=BF16)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    ang = torch.rand(t, d // 2, device=DEV) * 100
    ref_q, ref_k = rotary_ref(q, ang.cos(), ang.sin()), rotary_ref(k, ang.cos(), ang.sin())
    rotary_inplace(q, k, ang.cos(), ang.sin())
    assert _rel(q, ref_q) < 1e-2 and _rel(k, ref_k) < 1e-2
    slot = torch.randperm(64, device=DEV)[:t]
    kc = torch.randn(64, hkv, d, device=DEV, dtype=BF16)
    vc = torch.randn_like(kc)
    rk, rv = kc.clone(), vc.clone()
    kv_write(k, v, kc, vc, slot)
    kv_write_ref(k, v, rk, rv, slot)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)
