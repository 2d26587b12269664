"""On CUDA, decode steps replay CUDA graphs padded to a batch bucket: the tokens and
logprobs must be those of the eager engine, with and without a library, while the batch
shrinks through several buckets (the padding rows must never touch a live request's KV)."""

import random

import pytest
import torch

from moska import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DOCS = [
    ("a.md", "MoSKA shares the KV of a long context across many requests. " * 6),
    ("b.md", "Each decode step routes every request to its top-k chunks and batches them. " * 4),
]


def _generate(tmp_path, enforce_eager: bool, library, top_k, precapture=False, asyn=None):
    llm = LLM(
        None,
        device="cuda",
        dtype="float32",
        num_kv_blocks=512,
        max_model_len=4096,  # what 512 blocks of 16 hold (the startup memory check)
        library_root=str(tmp_path),
        enforce_eager=enforce_eager,
        async_scheduling=asyn,
    )
    if library is not None and not llm.engine.libraries.exists(library):
        llm.engine.libraries.build(library, DOCS, chunk_size=32, mode="prefix")
    engine = llm.engine
    if precapture:
        if library is not None:
            engine.libraries.get(library)  # loaded: pre-capture covers loaded libraries
        n = engine.capture_graphs(progress=False)
        buckets = len(engine.runner.graphs.buckets)
        assert n == buckets * (1 if library is None else 2)
    rng = random.Random(0)
    outs = []
    # 11 requests with different lengths: the batch goes 11 -> ... -> 1 (buckets 16..1)
    for i in range(11):
        prompt = [rng.randrange(0, 256) for _ in range(rng.randrange(3, 20))]
        params = SamplingParams(temperature=0, max_tokens=3 + i, ignore_eos=True, logprobs=3)
        outs.append((prompt, params))
    for i, (prompt, params) in enumerate(outs):
        engine.add_request(f"r{i}", prompt, params, library=library, top_k_chunks=top_k)
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    graphs = engine.runner.graphs
    if precapture:  # every step replayed a graph captured ahead of it
        assert graphs is not None and graphs.captures == n
    return done, (0 if graphs is None else len(graphs._graphs))


@pytest.mark.parametrize(
    "library,top_k,precapture",
    [(None, None, False), ("docs", 2, False), ("docs", 10**6, False), ("docs", None, True)],
)
def test_graph_replay_matches_eager(tmp_path, library, top_k, precapture):
    eager, n_eager = _generate(tmp_path, True, library, top_k)
    graphed, n_graphs = _generate(tmp_path, False, library, top_k, precapture)
    assert n_eager == 0 and n_graphs >= 4  # several buckets were captured and replayed
    assert eager.keys() == graphed.keys() and len(eager) == 11
    for rid, a in eager.items():
        b = graphed[rid]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, rid
        assert a.routed_chunks == b.routed_chunks, rid
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tok, lp in la.top.items():
                assert abs(lp - lb.top[tok]) < 1e-4


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_async_scheduling_matches_sync(tmp_path, enforce_eager):
    """Async scheduling on CUDA (input tokens read from the device, pinned host copies)
    gives the tokens and logprobs of the synchronous engine, graphs or not."""
    sync, _ = _generate(tmp_path, enforce_eager, None, None, asyn=False)
    asyn, _ = _generate(tmp_path, enforce_eager, None, None, asyn=True)
    assert sync.keys() == asyn.keys() and len(sync) == 11
    for rid, a in sync.items():
        b = asyn[rid]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, rid
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.token_id == lb.token_id
            for tok, lp in la.top.items():
                assert abs(lp - lb.top[tok]) < 1e-5
