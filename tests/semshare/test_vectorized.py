"""The reuse path's vectorized pieces against plain references on random inputs: the tensor
LSH index votes and ranks as the dict-of-buckets index it replaced (through adds, removes
and run merges), token matching finds each row's nearest reference token, re-rotation is
bit-identical to the rotate-half product, and the row attention (cuDNN excluded) equals a
per-row masked softmax."""

from collections import Counter

import torch
import torch.nn.functional as F

from moska.semshare import lsh as lsh_mod
from moska.semshare.lsh import LSHIndex, _share_in
from moska.semshare.matching import match_tokens, token_features
from moska.semshare.rope_shift import rotate_by
from moska.semshare.row_attention import _BACKENDS, RowAttention

V, H = 300, 24


def _plain_votes(index: LSHIndex, live: dict, keys: torch.Tensor) -> Counter:
    """Votes as the former index counted them: per unique key, the references in its bucket."""
    buckets: dict[int, set] = {}
    for ref, feats in live.items():
        for key in torch.unique(index.signatures(feats)).tolist():
            buckets.setdefault(key, set()).add(ref)
    votes: Counter = Counter()
    for key in torch.unique(keys).tolist():
        votes.update(buckets.get(key, ()))
    return votes


def test_tensor_lsh_index_matches_plain_buckets():
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(V, H, generator=gen)
    index = LSHIndex(2 * H, bands=4, rows=6, seed=1)  # short codes: many shared buckets
    base = torch.randint(0, V, (80,), generator=gen)
    live = {}
    for i in range(2 * lsh_mod._MAX_RUNS + 3):  # more adds than runs kept: merges happen
        ids = base.clone()
        ids[torch.randint(0, 80, (8 * (i % 5),), generator=gen)] = i
        live[f"r{i}"] = token_features(embed, ids)
        index.add(f"r{i}", live[f"r{i}"])
        if i % 4 == 3:  # removals before and after merges
            gone = f"r{i - 2}"
            index.remove(gone)
            del live[gone]
    index.remove("r0")  # its entries stay in the runs until a merge: votes skip them
    del live["r0"]
    assert index._dead > 0 and len(index) == len(live) and len(index._runs) <= lsh_mod._MAX_RUNS
    for trial in range(3):
        q = base.clone()
        q[torch.randint(0, 80, (10 * trial,), generator=gen)] = V - 1
        feats = token_features(embed, q)
        sigs = index.signatures(feats)
        ids, counts = index.votes(torch.unique(sigs))
        got = {index._refs[i]: c for i, c in zip(ids.tolist(), counts.tolist())}
        assert got == dict(_plain_votes(index, live, sigs)) and got
        found = index.candidates(feats, top=len(live), sample=None)
        # every shortlisted reference's share is exact, and they come best first
        for ref, share in found:
            assert share == _share_in(sigs, torch.unique(index.signatures(live[ref])))
        assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
        best = max(live, key=lambda r: _share_in(sigs, torch.unique(index.signatures(live[r]))))
        assert found[0][1] == _share_in(sigs, torch.unique(index.signatures(live[best])))
    for ref in list(live):
        index.remove(ref)
    assert index.candidates(token_features(embed, base)) == [] and index._runs == []


def test_match_tokens_equals_per_row_nearest():
    gen = torch.Generator().manual_seed(3)
    embed = torch.randn(V, H, generator=gen)
    ref_ids = torch.randint(0, V, (120,), generator=gen)
    new_ids = torch.cat([torch.randint(0, V, (2100,), generator=gen), ref_ids[10:90]])
    new, ref = token_features(embed, new_ids), token_features(embed, ref_ids).half()
    m = match_tokens(new, ref, threshold=0.8)  # > 2,048 rows: more than one block
    want_pos = torch.full((new.shape[0],), -1)
    want_sim = torch.empty(new.shape[0])
    for i in range(new.shape[0]):
        sims = (ref.float() * new[i]).sum(dim=1)
        want_sim[i], j = sims.max(0)
        if want_sim[i] >= 0.8:
            want_pos[i] = j
    assert torch.equal(m.ref_pos, want_pos)
    assert torch.allclose(m.similarity, want_sim, rtol=1e-5, atol=1e-6)
    assert m.num_matched >= 70  # the planted run matched


def test_rotate_by_is_the_rotate_half_product():
    gen = torch.Generator().manual_seed(4)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    delta = torch.randint(-500, 500, (9,), generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(3, 9, 2, 16, generator=gen).to(dtype)
        freqs = delta.double()[:, None] * inv_freq.double()[None, :]
        cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1).float()[:, None, :]
        sin = torch.cat((freqs.sin(), freqs.sin()), dim=-1).float()[:, None, :]
        kf = k.float()
        want = (kf * cos + torch.cat((-kf[..., 8:], kf[..., :8]), dim=-1) * sin).to(dtype)
        assert torch.equal(rotate_by(k, delta, inv_freq), want)


class _Cache:
    def __init__(self, k, v):
        self.k, self.v = k, v


def test_row_attention_equals_masked_softmax():
    from torch.nn.attention import SDPBackend

    assert SDPBackend.CUDNN_ATTENTION not in _BACKENDS  # plans a graph per row count
    gen = torch.Generator().manual_seed(5)
    layers, blocks, bs, hkv, hq, d = 2, 6, 4, 2, 4, 8
    k = torch.randn(layers, blocks, bs, hkv, d, generator=gen)
    v = torch.randn(layers, blocks, bs, hkv, d, generator=gen)
    s = 21
    table = torch.tensor([5, 2, 0, 4, 1, 3])
    slots = (table[torch.arange(s) // bs] * bs + torch.arange(s) % bs).long()
    positions = torch.tensor([0, 3, 4, 9, 15, 20])  # arbitrary rows, ascending
    att = RowAttention(_Cache(k.clone(), v.clone()), slots, positions, d**-0.5)
    q = torch.randn(6, hq, d, generator=gen)
    kn, vn = torch.randn(6, hkv, d, generator=gen), torch.randn(6, hkv, d, generator=gen)
    out = att(1, q, kn, vn)
    kc, vc = k[1].reshape(-1, hkv, d).clone(), v[1].reshape(-1, hkv, d).clone()
    kc[slots[positions]], vc[slots[positions]] = kn, vn
    keys, values = kc[slots], vc[slots]  # [S, Hkv, D] by position
    for r, p in enumerate(positions.tolist()):
        for h in range(hq):
            kv = h // (hq // hkv)
            w = F.softmax(keys[: p + 1, kv] @ q[r, h] * d**-0.5, dim=0)
            want = w @ values[: p + 1, kv]
            assert float((out[r, h] - want).norm() / want.norm()) < 1e-5


def test_row_attention_causal_equals_masked_over_every_row():
    gen = torch.Generator().manual_seed(6)
    k, v = torch.randn(1, 5, 4, 2, 8, generator=gen), torch.randn(1, 5, 4, 2, 8, generator=gen)
    slots = torch.randperm(20, generator=gen)[:17]
    q = torch.randn(17, 4, 8, generator=gen)
    kn, vn = torch.randn(17, 2, 8, generator=gen), torch.randn(17, 2, 8, generator=gen)
    outs = []
    for causal in (True, False):
        att = RowAttention(_Cache(k.clone(), v.clone()), slots, torch.arange(17), 0.3, causal)
        outs.append(att(0, q, kn, vn))
    assert float((outs[0] - outs[1]).norm() / outs[1].norm()) < 1e-5
