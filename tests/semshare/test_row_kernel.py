"""The blend's row attention through the Triton kernel (interpreter on the CPU) against its
SDPA path: one call on random inputs (fp32, fp16), and a whole blend of the built-in tiny
model; the CPU's default is SDPA."""

import pytest
import torch

from moska.attention.kv_cache import PagedKVCache
from moska.model import load_model
from moska.model.default import default_model_dir
from moska.semshare import row_attention as row_attention_module
from moska.semshare.blend import blend_prefill, extend
from moska.semshare.config import SemShareConfig
from moska.semshare.matching import match_tokens
from moska.semshare.reuse import SemanticReuse
from moska.semshare.row_attention import RowAttention


class _Cache:
    def __init__(self, k, v):
        self.k, self.v = k, v


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_kernel_equals_sdpa_on_scattered_rows(dtype, tol):
    gen = torch.Generator().manual_seed(7)
    layers, blocks, bs, hkv, hq, d = 2, 6, 8, 2, 8, 16
    k = torch.randn(layers, blocks, bs, hkv, d, generator=gen).to(dtype)
    v = torch.randn(layers, blocks, bs, hkv, d, generator=gen).to(dtype)
    s = 43
    table = torch.tensor([5, 2, 0, 4, 1, 3])
    slots = (table[torch.arange(s) // bs] * bs + torch.arange(s) % bs).long()
    positions = torch.tensor([0, 1, 2, 9, 10, 20, 21, 22, 23, 35, 42])  # incl. first and last
    q = torch.randn(11, hq, d, generator=gen).to(dtype)
    kn = torch.randn(11, hkv, d, generator=gen).to(dtype)
    vn = torch.randn(11, hkv, d, generator=gen).to(dtype)
    outs, caches = [], []
    for kernel in (True, False):
        cache = _Cache(k.clone(), v.clone())
        outs.append(RowAttention(cache, slots, positions, d**-0.5, kernel=kernel)(1, q, kn, vn))
        caches.append(cache)
    assert outs[0].dtype == dtype and outs[0].shape == (11, hq, d)
    assert _rel(outs[0], outs[1]) < tol
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


def test_cpu_default_is_sdpa(monkeypatch):
    calls = []

    def fake(q, *args):
        calls.append(1)
        return q

    monkeypatch.setattr(row_attention_module, "row_attention", fake)
    gen = torch.Generator().manual_seed(8)
    k, v = torch.randn(1, 4, 8, 2, 16, generator=gen), torch.randn(1, 4, 8, 2, 16, generator=gen)
    q = torch.randn(3, 4, 16, generator=gen)
    att = RowAttention(_Cache(k, v), torch.arange(32), torch.tensor([0, 7, 31]), 0.25)
    assert att(0, q, None, None).shape == (3, 4, 16) and calls == []
    att.kernel = True
    att(0, q, None, None)
    assert calls == [1]


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_dir(), dtype="float32", device="cpu").model


def test_blend_with_kernel_equals_blend_with_sdpa(model):
    """Partial reuse (scattered rows past the first layer), then a continuation at start > 0:
    the kernel's cache and hidden states equal SDPA's."""
    c = model.config
    gen = torch.Generator().manual_seed(9)
    ref_ids = torch.randint(0, 256, (40,), generator=gen)
    ids = ref_ids.clone()
    ids[[6, 17, 30]] = (ids[[6, 17, 30]] + 1) % 256
    cache = PagedKVCache(c.num_kv_layers, 4, 16, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    extend(model, cache, [0, 1, 2, 3], ref_ids, 0)
    reuse = SemanticReuse(SemShareConfig(), model, cache)
    ref = reuse.reference("ref", ref_ids, [0, 1, 2, 3])
    ref_pos = match_tokens(reuse.features(ids), ref.features, 0.9).ref_pos[:-1]
    got = []
    for kernel in (True, False):
        out = PagedKVCache(c.num_kv_layers, 4, 16, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
        res = blend_prefill(
            model, out, [3, 1, 0, 2], ids[:-1], 0, ref, ref_pos, 0.2, 1, row_kernel=kernel
        )
        hidden = extend(model, out, [3, 1, 0, 2], ids[-1:], 39, row_kernel=kernel)
        got.append((res, out.k, out.v, hidden))
    (res_k, k_k, v_k, h_k), (res_s, k_s, v_s, h_s) = got
    assert res_k == res_s and 0 < res_k.num_recomputed < 39
    assert _rel(k_k, k_s) < 1e-4 and _rel(v_k, v_s) < 1e-4 and _rel(h_k, h_s) < 1e-4


def test_warm_row_kernel_runs_every_variant_and_writes_nothing():
    """`warm_row_kernel` (run at engine start on CUDA) calls the kernel at one row, fewer than
    half and all of the positions, each also at a count that is no multiple of 16; it reads
    the cache and leaves it as it was. Off CUDA it does nothing unless asked (interpreter)."""
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 4, 16, 2, 16, generator=gen)  # [layers, blocks, bs, Hkv, D]
    cache = _Cache(k, torch.randn(k.shape, generator=gen))
    before = cache.k.clone(), cache.v.clone()
    assert row_attention_module.warm_row_kernel(cache, 4, 0.25, 40) == 0  # CPU: skipped
    assert row_attention_module.warm_row_kernel(cache, 4, 0.25, 40, cuda_only=False) == 5
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
