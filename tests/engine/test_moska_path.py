"""MoSKA in the engine: a request that reads a prefix-mode library with top_k = all chunks
generates exactly what the same model generates with the library's tokens prepended to
the prompt; routed requests read top-k chunks and say which."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton variant below runs on CPU

import random

import pytest
import torch

from moska import LLM, SamplingParams
from moska.model.reference import DenseAttention, greedy_generate

DOCS = [
    ("a.md", "MoSKA shares the KV of a long context across many requests. " * 3),
    ("b.md", "Each decode step routes every request to its top-k chunks and batches them."),
]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("libs")
    llm = LLM(
        None,
        device="cpu",
        dtype="float32",
        attention="torch",
        num_kv_blocks=256,
        max_model_len=1024,
        library_root=str(root),
    )
    llm.engine.libraries.build("docs", DOCS, chunk_size=32, mode="prefix")
    return llm


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randrange(3, 20))] for _ in range(n)]


def test_all_chunks_equals_prepended_context(llm):
    lib = llm.engine.libraries.get("docs")
    assert lib.num_chunks >= 3
    lib_ids = lib.token_ids.tolist()
    model = llm.engine.loaded.model
    prompts = _prompts(4, seed=0)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompts, params, library="docs", top_k_chunks=10**6)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_generate(model, lib_ids + p, 6)
    # logits within tolerance: the first token's top-5 logprobs against the dense reference
    attn = DenseAttention(model.config.sm_scale)
    ids = torch.tensor(lib_ids + prompts[0])
    ref = torch.log_softmax(model.compute_logits(model(ids, torch.arange(len(ids)), attn)[-1:]), -1)
    top = outs[0].outputs[0].logprobs[0].top
    for tok, lp in top.items():
        assert abs(lp - ref[0, tok].item()) < 1e-4


def test_routed_requests_report_chunks_and_mix_with_plain(llm):
    prompts = _prompts(3, seed=1)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params, library="docs", top_k_chunks=2)
    eng.add_request("plain", prompts[0], params)  # no library, same batch
    routed = {}
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.routed_chunks is not None:
                routed[out.request_id] = out.routed_chunks
            if out.finished:
                done[out.request_id] = out
    assert set(done) == {"r0", "r1", "r2", "plain"}
    for i in range(3):
        chunks = routed[f"r{i}"]
        assert len(chunks) == 2 and len(set(chunks)) == 2
        assert all(0 <= c < eng.libraries.get("docs").num_chunks for c in chunks)
    model = eng.loaded.model
    assert done["plain"].outputs[0].token_ids == greedy_generate(model, prompts[0], 4)


def test_unknown_library_is_a_typed_error(llm):
    from moska.library.errors import LibraryNotFoundError

    with pytest.raises(LibraryNotFoundError):
        llm.engine.add_request("x", [1, 2], SamplingParams(), library="nope")
    assert not llm.engine.has_unfinished_requests()


def test_triton_kernels_in_the_engine_match(llm):
    """The same exactness with the Triton kernels (interpreter on CPU) behind attention."""
    # the library is built with the PyTorch kernels (the interpreter would spend seconds on
    # its prefill) and loaded from the store by the engine that runs the Triton kernels;
    # two chunks (32 tokens and a ragged 9): every grouped launch pays per chunk and KV head
    llm.engine.libraries.build("small", [("b.md", DOCS[1][1][:40])], chunk_size=32, mode="prefix")
    root = llm.engine.config.library_root
    kw = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64, "max_model_len": 1024}
    tri = LLM(None, attention="triton", library_root=root, **kw)
    assert tri.engine.libraries.get("small").num_chunks == 2
    lib_ids = tri.engine.libraries.get("small").token_ids.tolist()
    p = [7, 8, 9, 10]
    # two tokens: one prefill step and one decode step through every kernel (each launch
    # costs milliseconds in the interpreter)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    out = tri.generate([p], params, library="small", top_k_chunks=10**6)[0]
    # the reference runs on the PyTorch engine's model (the same seeded weights, checked):
    # the Triton engine's model would run its norms and RoPE in the interpreter (~40 s)
    ref_model = llm.engine.loaded.model
    ref_sd, tri_sd = ref_model.state_dict(), tri.engine.loaded.model.state_dict()
    assert ref_sd.keys() == tri_sd.keys()
    assert all(torch.equal(ref_sd[k], tri_sd[k]) for k in ref_sd)
    assert out.outputs[0].token_ids == greedy_generate(ref_model, lib_ids + p, 2)


def test_routing_coverage_reported(llm):
    p = [3, 1, 4, 1, 5]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    full = llm.generate([p], params, library="docs", top_k_chunks=10**6, report_routing=True)[0]
    assert abs(full.routing_coverage - 1.0) < 1e-5  # every chunk routed: all the mass
    part = llm.generate([p], params, library="docs", top_k_chunks=1, report_routing=True)[0]
    assert 0.0 < part.routing_coverage < 1.0
    assert len(part.routed_chunks) == 1
    plain = llm.generate([p], params, library="docs", top_k_chunks=1)[0]
    assert plain.routing_coverage is None
