import math

import torch

from moska.engine.sampler import Sampler
from moska.engine.sampling_params import SamplingParams


def _logits(n=4, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 3


def test_greedy_is_argmax():
    logits = _logits()
    out = Sampler()(logits, [SamplingParams(temperature=0)] * 4, ["a", "b", "c", "d"])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_one_equals_greedy_even_with_temperature():
    logits = _logits()
    params = [SamplingParams(temperature=1.5, top_k=1)] * 4
    out = Sampler()(logits, params, ["a", "b", "c", "d"])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_p_keeps_only_nucleus():
    logits = torch.tensor([[5.0, 4.0, -10.0, -10.0, -10.0]])
    s = Sampler()
    seen = set()
    for i in range(200):
        out = s(logits, [SamplingParams(temperature=1.0, top_p=0.9)], [f"r{i}"])
        seen.add(out.token_ids[0])
    assert seen <= {0, 1} and seen == {0, 1}


def test_seed_is_reproducible_and_batch_independent():
    logits = _logits(n=3, v=1000)
    p = SamplingParams(temperature=1.0, seed=7)
    a = Sampler(seed=1)(logits, [p, p, p], ["x", "y", "z"]).token_ids
    b = Sampler(seed=2)(logits[1:2], [p], ["y"]).token_ids
    assert a[1] == b[0]
    c = Sampler(seed=3)(logits, [p, p, p], ["x", "y", "z"]).token_ids
    assert a == c


def test_sampling_follows_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    s = Sampler(seed=0)
    counts = [0, 0, 0]
    n = 3000
    for i in range(n):
        counts[s(logits, [SamplingParams(temperature=1.0)], ["r"]).token_ids[0]] += 1
    assert abs(counts[0] / n - 0.7) < 0.04 and abs(counts[2] / n - 0.1) < 0.03


def test_logprobs_match_log_softmax():
    logits = _logits(n=2)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)]
    out = Sampler()(logits, params, ["a", "b"])
    lp = torch.log_softmax(logits, -1)
    chosen, top = out.logprobs[0]
    assert math.isclose(chosen, lp[0].max().item(), rel_tol=1e-5)
    assert len(top) == 3 and out.logprobs[1] is None
    assert list(top) == lp[0].topk(3).indices.tolist()


def test_mixed_batch_greedy_seeded_and_unseeded_rows():
    # greedy rows stay argmax, a seeded row keeps its batch-independent draw, and the
    # unseeded rows (one shared draw) follow their distribution
    logits = _logits(n=4, v=1000)
    seeded = SamplingParams(temperature=1.0, seed=11)
    params = [SamplingParams(temperature=0), seeded, SamplingParams(temperature=1.0)] + [
        SamplingParams(temperature=0)
    ]
    out = Sampler(seed=5)(logits, params, ["g", "s", "u", "g2"]).token_ids
    assert out[0] == int(logits[0].argmax()) and out[3] == int(logits[3].argmax())
    alone = Sampler(seed=9)(logits[1:2], [seeded], ["s"]).token_ids
    assert out[1] == alone[0]
    peaked = torch.full((2, 5), -30.0)
    peaked[0, 2] = peaked[1, 4] = 30.0  # unseeded rows: nearly one-hot distributions
    two = [SamplingParams(temperature=1.0)] * 2
    assert Sampler()(peaked, two, ["a", "b"]).token_ids == [2, 4]
