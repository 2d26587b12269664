"""The engine with shared-KV ranks (shared_kv_ranks=2) on the tiny Llama over gloo: rank 0
routes, two weightless processes hold the library's chunks (5 chunks: uneven, 3 + 2) and
attend them; fp32 logits and greedy tokens equal the single-process engine's, reading every
chunk and routed; a library built after startup (one chunk: a shared rank with none) reaches
them; what they cannot serve is refused; a killed shared rank fails the engine within 10 s."""

from __future__ import annotations

import pytest
from test_tp_library import PER_HEAD, PROMPTS, greedy_library, library_logits
from tp_support import (
    EnginePair,
    build_checkpoint,
    engine_kwargs,
    kill_rank_mid_step,
    rel_err,
    two_docs,
)

from moska.distributed.shared_kv_engine import SharedKVConfigError
from moska.engine.errors import RequestError
from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(180)

CHUNK = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("skv")
    path = build_checkpoint(base / "m", seed=2)
    kw = engine_kwargs("cpu", library_root=str(base / "libraries"))
    ref = LLMEngine.from_model(str(path), **kw)
    ref.libraries.progress = False
    ref.libraries.build("docs", two_docs(0, 80), chunk_size=CHUNK)  # 5 chunks over 2 ranks
    pair = EnginePair(ref, lambda: LLMEngine.from_model(str(path), **kw, shared_kv_ranks=2))
    try:
        yield pair
    finally:
        pair.shutdown()


@pytest.mark.parametrize("top_k", [5, 2])
def test_library_logits_equal_one_process(setup, top_k):
    ref, eng = setup
    calls = eng.libraries.shared_kv.calls
    want = library_logits(ref, "docs", top_k, PER_HEAD)
    got = library_logits(eng, "docs", top_k, PER_HEAD)
    assert got.shape == want.shape == (sum(map(len, PROMPTS)), 256)
    assert rel_err(got, want) < 1e-4
    assert eng.libraries.shared_kv.calls == calls + 2  # each layer went to the shared ranks
    if top_k < 5:  # routing dropped chunks that matter: not the all-chunks output
        assert rel_err(want, library_logits(ref, "docs", 5, PER_HEAD)) > 1e-3
    lib = eng.libraries.get("docs")
    assert lib.k_pools[0].stride(0) == 0  # rank 0 holds no library KV
    client = eng.libraries.shared_kv.clients[lib.build_id]
    assert client.placement.chunks_of(0) == (0, 2, 4) and client.placement.chunks_of(1) == (1, 3)


@pytest.mark.parametrize("top_k", [None, 2])
def test_library_greedy_tokens_equal_one_process(setup, top_k):
    ref, eng = setup
    want = greedy_library(ref, "docs", 5, top_k)
    got = greedy_library(eng, "docs", 5, top_k)
    assert got == want and len(got["lib0"]) == 5
    assert eng.libraries.num_users("docs") == 0


def test_library_built_after_startup_reaches_the_shared_ranks(setup):
    ref, eng = setup
    ref.libraries.build("late", two_docs(7, 16), chunk_size=CHUNK)  # one chunk: rank 1 holds none
    got = greedy_library(eng, "late", 4, None)
    assert got == greedy_library(ref, "late", 4, None)
    build = eng.libraries.get("late").build_id
    assert eng.dist.channel.worker_builds.get(build) == "late"
    assert eng.libraries.unload("late")
    eng.libraries.sync_workers()
    assert build not in eng.dist.channel.worker_builds


def test_what_shared_ranks_cannot_serve_is_refused(setup):
    from moska.library.builder import build_in_memory

    ref, eng = setup
    lib, _ = build_in_memory(
        ref.loaded, two_docs(3, 32), "scratch", chunk_size=CHUNK, progress=False
    )
    with pytest.raises(SharedKVConfigError, match="only in this process's memory"):
        eng.libraries._register("scratch", lib)
    with pytest.raises(RequestError, match="report_routing"):
        eng.add_request("r", [5, 6], SamplingParams(max_tokens=2), library="docs",
                        report_routing=True)  # fmt: skip
    with pytest.raises(RequestError, match="shared-KV"):
        eng.add_request("c", [5, 6], SamplingParams(max_tokens=2), libraries=["docs", "late"])
    assert not eng.has_unfinished_requests() and eng.libraries.num_users("docs") == 0
    with pytest.raises(ValueError, match="runs without tensor_parallel_size, shared_kv_ranks"):
        LLMEngine.from_model(None, shared_kv_ranks=1, decode_context_parallel_size=2)
    with pytest.raises(SharedKVConfigError, match="library_gpu_budget"):
        LLMEngine.from_model(None, device="cpu", shared_kv_ranks=1, library_gpu_budget="1GiB")


def test_hot_chunk_replicas_are_exact_and_even_the_load(setup, monkeypatch):
    """5 chunks by chunk id: 3 + 2 over the two shared ranks, so at top_k = all rank 0
    attends 1.5x rank 1's selections; two replica slots per rank even that out, and the
    logits and greedy tokens stay one process's."""
    from moska.distributed import shared_kv_engine

    ref, eng = setup
    remote = eng.libraries.shared_kv
    client = remote.clients[eng.libraries.get("docs").build_id]
    want = library_logits(ref, "docs", 5, PER_HEAD)
    remote.loads.clear()
    library_logits(eng, "docs", 5, PER_HEAD)  # counts each chunk's readers
    by_id = remote.loads.report()
    placement = eng.libraries.replicate_hot_chunks("docs", 2)
    assert placement.max_replicas > 1 and client.placement is placement
    remote.loads.clear()
    assert rel_err(library_logits(eng, "docs", 5, PER_HEAD), want) < 1e-4
    replicated = remote.loads.report()
    assert by_id["imbalance_mean_forward"] > 1.15  # 3 chunks against 2
    assert replicated["imbalance_mean_forward"] < by_id["imbalance_mean_forward"]
    assert sum(replicated["selections_per_rank_per_forward"]) == sum(
        by_id["selections_per_rank_per_forward"]
    )  # the same work, dealt differently
    # automatic: back to chunk ids, then re-placed every 2 forwards while generating
    assert eng.libraries.replicate_hot_chunks("docs", 0).max_replicas == 1
    monkeypatch.setattr(shared_kv_engine, "REPLICA_WINDOW", 2)
    monkeypatch.setattr(remote, "replica_slots", 2)
    assert greedy_library(eng, "docs", 5, None) == greedy_library(ref, "docs", 5, None)
    assert client.placement.max_replicas > 1


def test_shared_rank_dies_during_a_library_request(setup):
    """Last: it kills shared rank 2 while a library request decodes."""
    _, eng = setup
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    eng.add_request("dying", [5, 6, 7], params, library="docs", top_k_chunks=2)
    eng.step()
    kill_rank_mid_step(eng, 2)
