"""The reuse path's session-13 fast pieces against plain references on random inputs: the
fused gather-rotate-scatter kernel (Triton interpreter) equals gather + `rotate_by` +
scatter; features equal a per-token loop (and their fp16 form); blocked matching equals
one block; and the blend queues its layers after a single host sync (counted at the aten
level), the plan after two (the LSH codes to the host, the matched count)."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moska.attention.kv_cache import PagedKVCache
from moska.kernels.rope_scatter import rope_scatter
from moska.model import load_model
from moska.model.default import default_model_dir
from moska.semshare import matching
from moska.semshare.blend import blend_prefill, extend
from moska.semshare.config import SemShareConfig
from moska.semshare.matching import inverse_norms, match_tokens, token_features
from moska.semshare.reuse import SemanticReuse
from moska.semshare.rope_shift import delta_cos_sin, rotate_by


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _INTERPRET, reason="interpreter only (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_rope_scatter_equals_gather_rotate_scatter(dtype, tol):
    gen = torch.Generator().manual_seed(11)
    layers, n, slots, h, d = 2, 30, 48, 2, 16
    k_src = torch.randn(layers, n, h, d, generator=gen).to(dtype)
    v_src = torch.randn(layers, n, h, d, generator=gen).to(dtype)
    src = torch.randperm(n, generator=gen)[:19]
    dst = torch.randperm(slots, generator=gen)[:19]
    delta = torch.randint(-3000, 3000, (19,), generator=gen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    kc = torch.randn(layers, slots, h, d, generator=gen).to(dtype)
    vc = torch.randn(layers, slots, h, d, generator=gen).to(dtype)
    want_k, want_v = kc.clone(), vc.clone()
    want_k[:, dst] = rotate_by(k_src[:, src].float(), delta, inv_freq).to(dtype)
    want_v[:, dst] = v_src[:, src]
    cos, sin = delta_cos_sin(delta, inv_freq)
    rope_scatter(k_src, v_src, kc, vc, src, dst, cos, sin, block_t=8)  # 3 tiles, 1 partial
    assert _rel(kc, want_k) < tol and torch.equal(vc, want_v)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[dst] = False
    assert torch.equal(kc[:, untouched], want_k[:, untouched])


def test_features_equal_a_per_token_loop():
    gen = torch.Generator().manual_seed(12)
    embed = torch.randn(300, 24, generator=gen)
    ids = torch.randint(0, 300, (50,), generator=gen)
    w = 3
    e = F.normalize(embed[ids], dim=-1)
    start = torch.full((24,), 24**-0.5)
    want = []
    for i in range(50):
        prev = [e[j] if j >= 0 else start for j in range(i - w, i)]
        ctx = F.normalize(torch.stack(prev).sum(0), dim=0)
        want.append(torch.cat([e[i], ctx]) * 0.5**0.5)
    want = torch.stack(want)
    got = token_features(embed, ids, w)
    assert _rel(got, want) < 1e-5
    fast = token_features(embed, ids, w, inv_norm=inverse_norms(embed), dtype=torch.float16)
    assert fast.dtype == torch.float16 and _rel(fast, want) < 1e-2


def test_blocked_matching_equals_one_block(monkeypatch):
    gen = torch.Generator().manual_seed(13)
    embed = torch.randn(200, 16, generator=gen)
    ref_ids = torch.randint(0, 200, (40,), generator=gen)
    new_ids = torch.cat([torch.randint(0, 200, (30,), generator=gen), ref_ids[5:35]])
    new, ref = token_features(embed, new_ids), token_features(embed, ref_ids)
    one = match_tokens(new, ref, 0.8)
    monkeypatch.setattr(matching, "_MAX_SIM", 7 * 40)  # blocks of 7 rows: 9 blocks
    blocked = match_tokens(new, ref, 0.8)
    assert torch.equal(one.ref_pos, blocked.ref_pos) and one.num_matched >= 20
    assert torch.equal(one.similarity, blocked.similarity)


# `item` and `is_nonzero` reach the mode whole under inference mode, `_local_scalar_dense`
# outside it
_SYNCS = {"nonzero", "_local_scalar_dense", "item", "is_nonzero", "_unique2", "masked_select"}


class _Syncs(TorchDispatchMode):
    """Host syncs by aten op name (what would wait on a GPU's stream)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        by_tensor = name == "repeat_interleave" and func._overloadname != "self_int"
        if name in _SYNCS or (by_tensor and not (kwargs or {}).get("output_size")):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_dir(), dtype="float32", device="cpu").model


def test_blend_syncs_once_and_plan_twice(model):
    gen = torch.Generator().manual_seed(14)
    c = model.config
    cache = PagedKVCache(c.num_kv_layers, 16, 16, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    ref_ids = torch.randint(0, 256, (90,), generator=gen)
    extend(model, cache, list(range(8)), ref_ids, 0)
    reuse = SemanticReuse(SemShareConfig(), model, cache)
    reuse.store.put(reuse.reference("ref", ref_ids, list(range(8))))
    ids = ref_ids.clone()
    ids[[12, 40, 70]] = (ids[[12, 40, 70]] + 1) % 256
    with _Syncs() as plan_syncs:
        plan = reuse.plan(ids.tolist())
    assert plan is not None and plan.ref.key == "ref"
    # the LSH codes' copy to the host is a `.cpu()` of a host tensor here: not dispatched
    assert len(plan_syncs.names) == 1  # the matched count (item)
    with _Syncs() as blend_syncs:
        res = blend_prefill(
            model, cache, list(range(8, 16)), ids[:-1], 0, plan.ref, plan.ref_pos[:-1], 0.2, 1
        )
    assert blend_syncs.names == ["nonzero"]
    matched = int((plan.ref_pos[:-1] >= 0).sum())
    assert 0 < res.num_reused < matched and res.num_recomputed == 89 - res.num_reused
