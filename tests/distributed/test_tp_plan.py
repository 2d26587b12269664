"""ShardPlan: every head, feature and vocabulary row is held, each query head next to the KV
head it reads; plain Python, no processes."""

from __future__ import annotations

import itertools

import pytest

from moska.distributed.errors import TensorParallelConfigError
from moska.distributed.tensor_parallel import ShardPlan, span
from moska.model.config import ModelConfig


def _config(hq: int, hkv: int, inter: int = 100, vocab: int = 101) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        hidden_size=hq * 8,
        num_layers=2,
        num_heads=hq,
        num_kv_heads=hkv,
        head_dim=8,
        intermediate_size=inter,
        vocab_size=vocab,
    )


@pytest.mark.parametrize(
    "hq,hkv,n",
    [(4, 2, 2), (4, 2, 3), (6, 2, 3), (8, 4, 3), (32, 8, 3), (32, 8, 8), (32, 8, 16), (4, 1, 4),
     (12, 4, 5), (4, 4, 1)],
)  # fmt: skip
def test_plan_covers_everything_once(hq, hkv, n):
    config = _config(hq, hkv)
    plans = [ShardPlan.build(config, r, n) for r in range(n)]
    group = hq // hkv
    q_owner = [None] * hq
    kv_holders: dict[int, list[int]] = {}
    for p in plans:
        assert p.q_heads[1] > p.q_heads[0], "every rank has a query head"
        for h in range(*p.q_heads):
            assert q_owner[h] is None
            q_owner[h] = p.rank
            assert p.kv_heads[0] <= h // group < p.kv_heads[1], "its KV head is local"
        for k in range(*p.kv_heads):
            kv_holders.setdefault(k, []).append(p.rank)
        local = p.local_config(config)
        assert local.num_heads % local.num_kv_heads == 0
        assert p.vocab_shard >= p.vocab[1] - p.vocab[0]
    assert None not in q_owner
    assert sorted(kv_holders) == list(range(hkv))
    if n <= hkv:  # split, not replicated; sizes differ by at most one
        assert all(len(r) == 1 for r in kv_holders.values())
        sizes = [p.kv_heads[1] - p.kv_heads[0] for p in plans]
        assert max(sizes) - min(sizes) <= 1
    else:  # each rank holds exactly one KV head
        assert all(p.kv_heads[1] - p.kv_heads[0] == 1 for p in plans)
    for field, total in (("intermediate", 100), ("vocab", 101)):
        spans = [getattr(p, field) for p in plans]
        assert spans[0][0] == 0 and spans[-1][1] == total
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_span_sizes_differ_by_at_most_one():
    for n in range(20):
        for parts in range(1, 7):
            sizes = [span(n, parts, i)[1] - span(n, parts, i)[0] for i in range(parts)]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1


def test_tensor_slices_name_the_sharded_tensors():
    config = _config(4, 2, inter=10, vocab=11)
    slices = ShardPlan.build(config, 1, 2).tensor_slices(config)
    q = slices["model.layers.0.self_attn.q_proj.weight"]
    assert (q.dim, q.start, q.stop, q.full) == (0, 16, 32, 32)
    o = slices["model.layers.1.self_attn.o_proj.weight"]
    assert (o.dim, o.start, o.stop) == (1, 16, 32)
    down = slices["model.layers.0.mlp.down_proj.weight"]
    assert (down.dim, down.start, down.stop, down.full) == (1, 5, 10, 10)
    assert slices["model.embed_tokens.weight"][1:3] == (6, 11)
    assert "model.norm.weight" not in slices  # replicated


def test_more_ranks_than_heads_is_refused():
    with pytest.raises(TensorParallelConfigError, match="at most 4"):
        ShardPlan.build(_config(4, 2), 0, 5)
