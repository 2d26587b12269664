"""Tensor parallelism beside shared-KV ranks (tensor_parallel_size=2, shared_kv_ranks=1: 3
processes over gloo) on the tiny Llama (4 query heads, 2 KV heads: one per TP rank): the TP
ranks route for their KV heads and send their heads' query rows to the shared rank, which
holds all of the library's chunks (5 of 16 tokens) and no weights; fp32 logits and greedy
tokens equal the single-process engine's, reading every chunk and routed (per KV head and
summed over heads, which exchanges scores between the TP ranks); no TP rank holds library
KV; a killed rank fails the engine within 10 s, naming it. On 2 GPUs ([cuda]): the TP pair
over NCCL (a GPU each), the exchange over gloo (the shared rank shares GPU 0)."""

from __future__ import annotations

import pytest
import torch
from test_tp_library import PER_HEAD, POLICIES, PROMPTS, greedy_library, library_logits
from tp_support import (
    DEVICES,
    EnginePair,
    build_checkpoint,
    engine_kwargs,
    kill_rank_mid_step,
    rel_err,
    two_docs,
)

from moska.engine.llm import LLM
from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(180)

CHUNK = 16


@pytest.fixture(scope="module", params=DEVICES)
def setup(request, tmp_path_factory):
    base = tmp_path_factory.mktemp("tpskv")
    path = build_checkpoint(base / "m", seed=3)
    kw = engine_kwargs(request.param, library_root=str(base / "libraries"))
    ref = LLMEngine.from_model(str(path), **kw)
    ref.libraries.progress = False
    ref.libraries.build("docs", two_docs(0, 80), chunk_size=CHUNK)  # 5 chunks
    pair = EnginePair(
        ref,
        # the offline API's arguments (LLM passes them to the engine)
        lambda: LLM(str(path), **kw, tensor_parallel_size=2, shared_kv_ranks=1).engine,
    )
    try:
        yield pair
    finally:
        pair.shutdown()


@pytest.mark.parametrize(("top_k", "policy"), [(5, "per_head"), (2, "per_head"), (2, "summed")])
def test_library_logits_equal_one_process(setup, top_k, policy):
    ref, eng = setup
    remote = eng.libraries.shared_kv
    calls = remote.calls
    want = library_logits(ref, "docs", top_k, POLICIES[policy])
    got = library_logits(eng, "docs", top_k, POLICIES[policy])
    assert got.shape == want.shape == (sum(map(len, PROMPTS)), 256)
    assert rel_err(got, want) < 1e-4
    assert remote.calls == calls + 2  # each layer went to the shared rank
    if top_k < 5:  # routing dropped chunks that matter: not the all-chunks output
        assert rel_err(want, library_logits(ref, "docs", 5, PER_HEAD)) > 1e-3
    # rank 0 holds its KV head of the routing index and no library KV
    lib = eng.libraries.get("docs")
    assert lib.k_pools[0].stride(0) == 0 and lib.k_pools[0].shape[1] == 1
    assert remote.layout.q_heads == ((0, 2), (2, 4)) and remote.kv_offset == 0
    if lib.k_pools[0].is_cuda and torch.cuda.device_count() >= 2:  # a GPU per TP rank
        assert eng.dist.groups.comm.backend == "nccl"


@pytest.mark.parametrize("top_k", [None, 2])
def test_library_greedy_tokens_equal_one_process(setup, top_k):
    ref, eng = setup
    want = greedy_library(ref, "docs", 5, top_k)
    got = greedy_library(eng, "docs", 5, top_k)
    assert got == want and len(got["lib0"]) == 5
    assert eng.libraries.num_users("docs") == 0


def test_killed_rank_fails_the_engine_naming_it(setup):
    """Last: it kills the shared rank (rank 2) while a library request decodes."""
    _, eng = setup
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    eng.add_request("dying", [5, 6, 7], params, library="docs", top_k_chunks=2)
    eng.step()
    kill_rank_mid_step(eng, 2)
