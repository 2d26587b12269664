"""The fidelity benchmark's CPU form, and routing policies through the real engine."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json

import pytest

from moska import LLM, SamplingParams
from moska.bench.fidelity_eval import k_for, sequence_loss
from moska.routing import RoutingPolicy

DOCS = [("a.md", "Routing keeps answers when it keeps the chunks that hold them. " * 6)]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    llm = LLM(
        None,
        device="cpu",
        dtype="float32",
        attention="torch",
        num_kv_blocks=128,
        max_model_len=1024,
        library_root=str(tmp_path_factory.mktemp("libs")),
    )
    llm.engine.libraries.build("doc", DOCS, chunk_size=16, mode="prefix")
    return llm


def test_all_chunks_loss_equals_the_dense_sequence(llm):
    """The benchmark's loss after a library at all chunks is the loss of the same tokens
    read after the library's tokens as one prompt (prefix mode is exact)."""
    eng = llm.engine
    lib = eng.libraries.get("doc")
    target = eng.tokenizer.encode("keep the chunks", add_special_tokens=False)
    routed = sequence_loss(eng, [target], "doc", lib.num_chunks, None)
    ids = lib.token_ids.tolist() + target
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    out = llm.generate([ids], params)[0]
    lps = [t.logprob for t in out.prompt_logprobs[-(len(target) - 1) :]]
    assert routed.n == len(lps)
    assert abs(routed.value + sum(lps) / len(lps)) < 1e-4


@pytest.mark.parametrize(
    "policy",
    [
        RoutingPolicy(),
        RoutingPolicy(mass_threshold=0.5),
        RoutingPolicy(page_size=4, per_kv_head=True),
        RoutingPolicy(dense_layers=0, always_first=False, always_last=False, scorer="mean"),
    ],
)
def test_policies_route_through_the_engine_and_report(llm, policy):
    lib = llm.engine.libraries.get("doc")
    C = lib.num_chunks
    k = k_for(0.5, C)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, routing=policy)
    out = llm.generate(["route me"], params, library="doc", top_k_chunks=k, report_routing=True)
    chunks = out[0].routed_chunks
    assert chunks and len(chunks) <= k and all(0 <= c < C for c in chunks)
    if policy.always_first:
        assert 0 in chunks
    if policy.always_last:
        assert C - 1 in chunks
    assert 0.0 < out[0].routing_coverage <= 1.0 + 1e-6


def test_retrieval_signal_refuses_an_untrained_model(tmp_path):
    from moska.bench import fidelity, train_retrieval

    model = tmp_path / "ret"
    train_retrieval.main(["--cpu-dry-run", "--steps", "2", "--out", str(model)])
    assert (model / "config.json").is_file() and (model / "retrieval_spec.json").is_file()
    out = tmp_path / "fid.json"
    fidelity.main(
        ["--retrieval-model", str(model), "--cpu-dry-run", "--context-tokens", "64",
         "--questions", "2", "--policies", "default", "--out", str(out)]
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert data["retrieval"]["refused"] is True
    assert data["retrieval"]["dense_accuracy"] < 0.9
    assert "summary" in data and data["env"]["git_commit"]


def test_http_routing_object_becomes_the_request_policy():
    from pydantic import ValidationError

    from moska.server.generate import sampling_params
    from moska.server.protocol import CompletionRequest

    body = CompletionRequest(
        model="m", prompt="x", library="doc", routing={"scorer": "mean", "mass_threshold": 0.8}
    )
    params = sampling_params(body, 4, None, 0)
    assert params.routing == RoutingPolicy(scorer="mean", mass_threshold=0.8)
    assert sampling_params(CompletionRequest(model="m", prompt="x"), 4, None, 0).routing is None
    with pytest.raises(ValidationError) as e:
        CompletionRequest(model="m", prompt="x", routing={"scorr": "mean"})
    assert "routing" in str(e.value)


def test_report_routing_gives_the_coverage_of_each_sampled_layer(llm):
    """Issue 17 point 4: the per-layer summary in Python (RequestOutput.routing_layers):
    the sampled layers' shares, whose mean is routing_coverage; all chunks cover all."""
    lib = llm.engine.libraries.get("doc")
    layers = llm.engine.model_config.num_kv_layers
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    out = llm.generate(["route me"], params, library="doc", top_k_chunks=1, report_routing=True)
    by_layer = out[0].routing_layers
    assert set(by_layer) == {0, layers // 2, layers - 1}
    assert all(0.0 < v <= 1.0 + 1e-6 for v in by_layer.values())
    assert min(by_layer.values()) < 1.0  # one chunk of several: some layer loses mass
    mean = sum(by_layer.values()) / len(by_layer)
    assert abs(mean - out[0].routing_coverage) < 1e-6
    full = llm.generate(
        ["route me"], params, library="doc", top_k_chunks=lib.num_chunks, report_routing=True
    )[0]
    assert all(abs(v - 1.0) < 1e-5 for v in full.routing_layers.values())
    plain = llm.generate(["route me"], params, library="doc", top_k_chunks=1)[0]
    assert plain.routing_layers is None


def test_a_library_built_without_a_chunk_size_is_cut_to_scale(llm):
    """Issue 17: LibraryManager.build (and so POST /v1/libraries) without a chunk size cut
    a library into one 4,096-token chunk (nothing to route); now the size scales with it."""
    from moska.routing.policy import default_chunk_size

    manager = llm.engine.libraries
    ids = [3 + (7 * i) % 250 for i in range(300)]  # token ids: the count is exact
    info = manager.build("scaled", [("doc", ids)], mode="prefix", keep_loaded=False)
    want = default_chunk_size(300)
    assert want < 300  # the old fixed 4,096 made this library one chunk
    assert info.chunk_size == want
    assert info.num_chunks == -(-300 // want) and info.num_chunks > 1
    explicit = manager.build("fixed", [("doc", ids)], 128, keep_loaded=False)
    assert explicit.chunk_size == 128 and explicit.num_chunks == 3
    for name in ("scaled", "fixed"):
        manager.delete(name)
