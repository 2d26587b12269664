"""Tensor parallelism over 2 ranks (rank 0 is this process, rank 1 a spawned worker) on the
tiny Llama (4 query heads, 2 KV heads: one KV head per rank), one 2-rank set for the whole
file (each start costs seconds of a spawned rank's imports): plain requests' fp32 logits and
greedy tokens equal one process's and each rank's cache holds its KV heads only; library
(shared KV) requests' fp32 logits and greedy tokens equal one process's,
reading every chunk and routed (per KV head, the default; summed over KV heads and two-stage,
which exchange scores between ranks; 3 ranks with a replicated KV head:
test_tp_library_routing.py). Each rank holds its KV heads of the library, loaded from the store;
a library built after startup reaches the workers; one held only in memory is refused; a
rank killed while a library request decodes behind a server fails it, and the next request is
a 503 naming the rank, within 10 s (last: it ends the set)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from tp_support import (
    DEVICES,
    EnginePair,
    build_checkpoint,
    engine_kwargs,
    greedy,
    prefill_inputs,
    prefill_logits,
    rel_err,
    two_docs,
)
from tp_support import greedy_library as shared_greedy_library

from moska.attention.metadata import LibraryGroup
from moska.distributed.errors import (
    RankFailedError,
    TensorParallelBuildError,
)
from moska.distributed.tp_library import InMemoryLibraryError
from moska.engine.llm_engine import LLMEngine
from moska.engine.sampling_params import SamplingParams
from moska.library.manager import LibraryManager
from moska.routing.policy import LEGACY, RoutingPolicy

pytestmark = pytest.mark.timeout(180)

CHUNK = 16
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42], [99]]
PLAIN_PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
    [40, 41, 42],
    [99],
]
PER_HEAD = RoutingPolicy()  # the default: each KV head picks its own chunks
POLICIES = {"per_head": PER_HEAD, "summed": LEGACY, "two_stage": LEGACY.replace(scorer="two_stage")}


@pytest.fixture(scope="module", params=DEVICES)
def setup(request, tmp_path_factory):
    base = tmp_path_factory.mktemp("tplib")
    path = build_checkpoint(base / "m", seed=1)
    kw = engine_kwargs(request.param, library_root=str(base / "libraries"))
    ref = LLMEngine.from_model(str(path), **kw)
    ref.libraries.progress = False
    ref.libraries.build("docs", two_docs(0), chunk_size=CHUNK)
    pair = EnginePair(ref, lambda: LLMEngine.from_model(str(path), **kw, tensor_parallel_size=2))
    try:
        yield pair
    finally:
        pair.shutdown()


@torch.inference_mode()
def library_logits(engine, name: str, top_k: int, policy: RoutingPolicy) -> torch.Tensor:
    """Logits [T, V] of one prefill forward of PROMPTS after library `name` (every row
    reads it), through the engine's model and attention (the engine must be idle)."""
    lib = engine.libraries.acquire(name)
    try:
        runner = engine.runner
        ids, pos, meta = prefill_inputs(
            PROMPTS, engine.config.block_size, runner.device, lib.position_offset
        )
        rows = torch.arange(len(ids), device=runner.device)
        meta.groups.append(LibraryGroup(lib, rows, top_k, policy=policy, all_rows=True))
        hidden = runner.model(ids, pos, runner.attention.bind(meta))
        return runner.model.compute_logits(hidden)
    finally:
        engine.libraries.release(lib)


def greedy_library(engine, name: str, max_tokens: int, top_k: int | None, routing=None):
    return shared_greedy_library(engine, PROMPTS, name, max_tokens, top_k, routing)


def test_logits_equal_one_process(setup):
    ref, tp = setup
    want = prefill_logits(ref, PLAIN_PROMPTS)
    got = prefill_logits(tp, PLAIN_PROMPTS)
    assert got.shape == want.shape == (sum(map(len, PLAIN_PROMPTS)), 256)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 1e-4


def test_greedy_tokens_equal_one_process(setup):
    ref, tp = setup
    # chunked prefill across steps (8-token budget), then batched decode
    want = greedy(ref, PLAIN_PROMPTS, 12)
    got = greedy(tp, PLAIN_PROMPTS, 12)
    assert got == want
    assert len(got["g0"]) == 12


def test_each_rank_caches_its_kv_heads(setup):
    ref, tp = setup
    assert ref.runner.cache.k.shape[-2] == 2
    assert tp.runner.cache.k.shape[-2] == 1  # [L, blocks, bs, Hkv local, D]
    assert tp.runner.num_blocks == ref.runner.num_blocks


def test_each_rank_holds_its_kv_heads(setup):
    ref, tp = setup
    full = ref.libraries.get("docs")
    lib = tp.libraries.get("docs")
    assert lib.num_chunks == full.num_chunks == 6
    assert lib.kv_heads == (0, 1)
    assert tuple(lib.k_pools[0].shape) == (96, 1, full.k_pools[0].shape[2])
    torch.testing.assert_close(lib.k_pools[1], full.k_pools[1][:, :1], rtol=0, atol=0)
    torch.testing.assert_close(lib.v_pools[0], full.v_pools[0][:, :1], rtol=0, atol=0)
    idx, whole = lib.routing[1], full.routing[1]  # the routing index's per-head parts
    for f in ("mean_keys", "key_min", "key_max", "lowrank_keys"):
        torch.testing.assert_close(getattr(idx, f), getattr(whole, f)[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(idx.basis, whole.basis[:1], rtol=0, atol=0)


@pytest.mark.parametrize("top_k,policy", [(6, "per_head"), (2, "per_head"), (2, "summed"),
                                          (2, "two_stage")])  # fmt: skip
def test_library_logits_equal_one_process(setup, top_k, policy):
    ref, tp = setup
    want = library_logits(ref, "docs", top_k, POLICIES[policy])
    got = library_logits(tp, "docs", top_k, POLICIES[policy])
    assert got.shape == want.shape == (sum(map(len, PROMPTS)), 256)
    assert rel_err(got, want) < 1e-4
    if top_k < 6:  # routing dropped chunks that matter: not the all-chunks output
        assert rel_err(want, library_logits(ref, "docs", 6, PER_HEAD)) > 1e-3
    assert tp.libraries.get("docs").build_id in tp.dist.channel.worker_builds


@pytest.mark.parametrize("top_k,routing", [(None, None), (2, None), (2, {"per_kv_head": False})])
def test_library_greedy_tokens_equal_one_process(setup, top_k, routing):
    ref, tp = setup
    want = greedy_library(ref, "docs", 6, top_k, routing)
    got = greedy_library(tp, "docs", 6, top_k, routing)
    assert got == want
    assert len(got["lib0"]) == 6
    assert tp.libraries.num_users("docs") == 0  # every request released its build


def test_library_built_after_startup_reaches_the_workers(setup):
    ref, tp = setup
    ref.libraries.build("late", two_docs(7, 64), chunk_size=CHUNK)
    assert not tp.libraries.loaded_names() or "late" not in tp.libraries.loaded_names()
    got = greedy_library(tp, "late", 4, 2)
    assert got == greedy_library(ref, "late", 4, 2)
    build = tp.libraries.get("late").build_id
    assert tp.dist.channel.worker_builds.get(build) == "late"
    # dropped by the manager and read by no request: the workers drop it too
    assert tp.libraries.unload("late")
    tp.libraries.sync_workers()
    assert build not in tp.dist.channel.worker_builds


def test_in_memory_library_is_refused(setup):
    from moska.library.builder import build_in_memory

    ref, tp = setup
    lib, _ = build_in_memory(
        ref.loaded, two_docs(3, 32), "scratch", chunk_size=CHUNK, progress=False
    )
    tp.libraries._register("scratch", lib)  # how the manager keeps a library it holds
    with pytest.raises(InMemoryLibraryError, match="only in this process's memory"):
        tp.add_request("mem", [1, 2, 3], SamplingParams(max_tokens=2), library="scratch")
    assert not tp.has_unfinished_requests() and tp.libraries.num_users("scratch") == 0
    with pytest.raises(TensorParallelBuildError, match="without --tensor-parallel-size"):
        tp.libraries.build("other", two_docs(4, 32), chunk_size=CHUNK)
    assert not tp.libraries.exists("other")


def test_a_build_over_http_is_a_400_naming_the_error(setup):
    """POST /v1/libraries on a tensor-parallel server: refused before a job is queued."""
    import httpx

    from moska.server.app import create_app
    from moska.server.background import background_server
    from moska.server.settings import ServerSettings

    _, tp = setup
    body = {"name": "web", "documents": [{"name": "a.txt", "text": "def f(): return 1"}]}
    with background_server(create_app(tp, ServerSettings())) as url:
        r = httpx.post(f"{url}/v1/libraries", json=body, timeout=30)
        listed = httpx.get(f"{url}/v1/libraries", timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "tensor_parallel_build_error"
    assert "'web'" in r.json()["error"]["message"]
    assert listed.status_code == 200 and "web" not in listed.text
    assert not tp.libraries.exists("web")
    LibraryManager.reserve(tp.libraries, "web").release()  # the refusal left no lock behind


def test_a_worker_that_cannot_load_the_library_is_named(setup):
    """Rank 0 holds a build whose file is damaged on disk afterwards: rank 1 cannot load it,
    the request is refused naming the rank, and the ranks go on serving."""
    from moska.distributed.tp_library import WorkerLibraryError
    from moska.library.format import layer_file

    ref, tp = setup
    ref.libraries.build("frail", two_docs(9, 32), chunk_size=CHUNK)
    tp.libraries.get("frail")  # rank 0 loads it (the workers load on a request's acquire)
    damaged = tp.libraries.root / "frail" / layer_file(1)
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(WorkerLibraryError, match="rank 1"):
        tp.add_request("frail", [5, 6], SamplingParams(max_tokens=2), library="frail")
    assert not tp.has_unfinished_requests() and tp.libraries.num_users("frail") == 0
    assert "frail" not in tp.dist.channel.worker_builds.values()
    assert greedy_library(tp, "docs", 3, 2) == greedy_library(ref, "docs", 3, 2)


def test_fp8_library_loads_its_kv_heads(setup):
    """load_library(kv_heads=) of an FP8 library: pools, per-token scales and the routing
    index's per-head parts are the whole load's slices, bit for bit."""
    from moska.library.loaded import load_library

    ref, _ = setup
    ref.libraries.build("docs8", two_docs(5, 48), chunk_size=CHUNK, kv_dtype="fp8")
    full = load_library(ref.libraries.root, "docs8", None, progress=False)
    part = load_library(ref.libraries.root, "docs8", None, progress=False, kv_heads=(1, 2))
    assert part.kv_heads == (1, 2) and full.kv_scale_pools is not None
    for layer in range(full.num_kv_layers):
        for got, want in zip((part.k_pools, part.v_pools), (full.k_pools, full.v_pools)):
            assert got[layer].dtype == torch.float8_e4m3fn
            assert torch.equal(got[layer].view(torch.uint8), want[layer][:, 1:].view(torch.uint8))
        for got, want in zip(part.kv_scale_pools[layer], full.kv_scale_pools[layer]):
            assert torch.equal(got, want[:, 1:])
        assert torch.equal(part.routing[layer].basis, full.routing[layer].basis[1:])
        assert torch.equal(part.routing[layer].key_max, full.routing[layer].key_max[:, 1:])
    with pytest.raises(ValueError, match="kv_heads"):
        load_library(ref.libraries.root, "docs8", None, progress=False, kv_heads=(1, 3))


def test_rank_dies_during_a_library_request(setup, caplog):
    """Last in this file: it kills rank 1 while a library request decodes behind a server.
    The request in flight ends with an error JSON, the next is a 503 naming the rank, within
    10 s, and the log names the rank."""
    import httpx

    from moska.server.app import create_app
    from moska.server.background import background_server
    from moska.server.settings import ServerSettings

    _, tp = setup
    decoding, steps, real_step = threading.Event(), [], tp.step

    def step():  # the server's engine thread: set once the library request is decoding
        out = real_step()
        steps.append(len(out))
        if len(steps) >= 3:  # its prefill and two decode steps
            decoding.set()
        return out

    app = create_app(tp, ServerSettings())
    body = {"model": tp.model_name, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
    dying = {**body, "max_tokens": 300, "ignore_eos": True, "library": "docs", "top_k_chunks": 2}
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        ok = client.post("/v1/completions", json=body)
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["choices"][0]["text"]) >= 0
        tp.step = step  # type: ignore[method-assign]
        answers: list[httpx.Response] = []
        poster = threading.Thread(
            target=lambda: answers.append(client.post("/v1/completions", json=dying))
        )
        poster.start()
        assert decoding.wait(30), steps
        os.kill(tp.dist.worker_pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        poster.join(30)
        after = client.post("/v1/completions", json=body)
        assert time.monotonic() - t0 < 10
    (failed,) = answers
    assert failed.status_code in (500, 503), failed.text
    assert "error" in failed.json()
    assert after.status_code == 503, after.text
    assert after.json()["error"]["code"] == "rank_failed"
    assert "rank 1" in after.json()["error"]["message"]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert any("rank 1" in r.getMessage() for r in errors)
    # the engine's step raised the typed error (the server logs it with its traceback)
    assert any(r.exc_info and isinstance(r.exc_info[1], RankFailedError) for r in errors)
