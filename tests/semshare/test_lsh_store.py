"""LSH finds planted near-duplicates; token matching finds planted tokens; the reference
store stays within its byte bound, evicts least recently used, and keeps the LSH index in
step with its entries."""

import torch

from moska.semshare.lsh import LSHIndex
from moska.semshare.matching import match_tokens, token_features
from moska.semshare.store import Reference, ReferenceStore, prompt_key

V, H = 500, 48


def _embed(seed=0):
    return torch.randn(V, H, generator=torch.Generator().manual_seed(seed))


def _ref(ids, embed, layers=2, hkv=1, d=8) -> Reference:
    ids = torch.as_tensor(ids)
    n = ids.shape[0]
    k = torch.randn(layers, n, hkv, d)
    return Reference(prompt_key(ids), ids, token_features(embed, ids), k, torch.randn_like(k))


def _edit(ids, gen, share=0.08):
    """A near duplicate: `share` of tokens replaced, a block moved to the end."""
    ids = ids.clone()
    n = ids.shape[0]
    pos = torch.randperm(n, generator=gen)[: int(share * n)]
    ids[pos] = torch.randint(0, V, (pos.numel(),), generator=gen)
    cut = n // 3
    return torch.cat([ids[:cut], ids[2 * cut :], ids[cut : 2 * cut]])


def test_lsh_finds_planted_near_duplicates():
    gen = torch.Generator().manual_seed(1)
    embed = _embed()
    lsh = LSHIndex(2 * H, bands=8, rows=16, seed=3)
    prompts = [torch.randint(0, V, (300,), generator=gen) for _ in range(30)]
    for i, p in enumerate(prompts):
        lsh.add(i, token_features(embed, p))
    for planted in (0, 7, 29):
        query = _edit(prompts[planted], gen)
        (best, score), *rest = lsh.candidates(token_features(embed, query), top=3)
        assert best == planted
        assert score > 0.5 and all(s < 0.2 for _, s in rest), (score, rest)
        sampled = lsh.candidates(token_features(embed, query), top=1, sample=64)
        assert sampled[0][0] == planted  # votes from 64 of the 300 tokens find it too
    lsh.remove(7)
    found = lsh.candidates(token_features(embed, _edit(prompts[7], gen)), top=1)
    assert not found or found[0][0] != 7


def test_token_matching_finds_planted_tokens():
    gen = torch.Generator().manual_seed(2)
    embed = _embed()
    ref = torch.randint(0, V, (200,), generator=gen)
    new = torch.cat([torch.randint(0, V, (20,), generator=gen), ref[50:150]])  # planted run
    m = match_tokens(token_features(embed, new), token_features(embed, ref), threshold=0.9)
    # past the first `window` tokens of the run, each token finds its own source position
    assert torch.equal(m.ref_pos[24:], torch.arange(54, 150))
    assert (m.ref_pos[:20] == -1).all()  # random tokens: nothing that close
    exact = match_tokens(token_features(embed, new), token_features(embed, ref), threshold=1.01)
    assert exact.num_matched == 0


def test_store_byte_bound_lru_and_index():
    gen = torch.Generator().manual_seed(4)
    embed = _embed()
    refs = [_ref(torch.randint(0, V, (64,), generator=gen), embed) for _ in range(4)]
    size = refs[0].nbytes
    store = ReferenceStore(int(2.5 * size), LSHIndex(2 * H, seed=0))
    assert store.put(refs[0]) and store.put(refs[1])
    store.get(refs[0].key)  # refs[1] is now the least recently used
    assert store.put(refs[2])
    assert refs[1].key not in store and refs[0].key in store and refs[2].key in store
    assert store.nbytes <= store.capacity_bytes and len(store.lsh) == len(store) == 2
    found = store.lookup(refs[1].features, min_score=0.3)
    assert found is None or found[0].key != refs[1].key  # evicted: gone from the index too
    hit = store.lookup(refs[2].features, min_score=0.9)
    assert hit is not None and hit[0] is refs[2]
    big = _ref(torch.randint(0, V, (200,), generator=gen), embed)
    assert not store.put(big) and store.stats.rejected == 1 and len(store) == 2


def test_lookup_without_touch_keeps_the_lru_order():
    """A candidate the engine then does not reuse (too few matched tokens) must not be
    refreshed: `lookup(touch=False)` finds it and leaves it next to be evicted."""
    gen = torch.Generator().manual_seed(5)
    embed = _embed()
    refs = [_ref(torch.randint(0, V, (64,), generator=gen), embed) for _ in range(3)]
    store = ReferenceStore(int(2.5 * refs[0].nbytes), LSHIndex(2 * H, seed=0))
    assert store.put(refs[0]) and store.put(refs[1])
    found = store.lookup(refs[0].features, min_score=0.9, touch=False)
    assert found is not None and found[0] is refs[0]
    assert store.lru_entries()[0] is refs[0]  # still the next to go
    assert store.put(refs[2]) and refs[0].key not in store and refs[1].key in store
    touched = store.lookup(refs[1].features, min_score=0.9)  # default: refreshed
    assert touched is not None and store.lru_entries()[-1] is refs[1]
