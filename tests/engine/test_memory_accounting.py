"""Memory accounting (engine/memory.py): the startup plan splits the budget into weights,
activations, CUDA graphs, unique KV and the library cache; a part that does not fit is a
typed error at startup (one line, exit 2 from the CLI); a library load that would not fit
is refused (HTTP 400 JSON) instead of running out of memory."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from moska.config import EngineConfig
from moska.engine.memory import (
    LibraryMemoryError,
    MemoryBudgetError,
    library_device_bytes,
    parse_size,
    plan_memory,
)

MCFG = SimpleNamespace(
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    hidden_size=256,
    intermediate_size=688,
    vocab_size=261,
    max_position_embeddings=1024,
)
SMALL = {"device": "cpu", "max_model_len": 256, "max_num_batched_tokens": 64, "max_num_seqs": 4}


def test_parse_size():
    assert parse_size("8GiB", "x") == 8 << 30 and parse_size("512MiB", "x") == 512 << 20
    assert parse_size("1.5", "x") == 3 << 29 and parse_size("100B", "x") == 100
    with pytest.raises(ValueError, match="memory_budget"):
        EngineConfig(memory_budget="lots")


@pytest.mark.parametrize("graphs", [False, True])
def test_plan_splits_the_budget(graphs):
    cfg = EngineConfig(memory_budget="64MiB", **SMALL)
    plan = plan_memory(cfg, MCFG, "cpu", 10 << 20, 1 << 16, 4, graphs, total=1 << 40)
    assert plan.budget == 64 << 20
    parts = plan.weights + plan.activations + plan.cuda_graphs + plan.kv_blocks
    assert parts + plan.library_pool == plan.budget  # every byte accounted for
    assert (plan.cuda_graphs > 0) == graphs
    assert plan.kv_blocks <= plan.library_pool + plan.kv_block_bytes  # half each
    assert len(plan.lines()) == 6


def test_plan_honours_blocks_and_library_reserve():
    cfg = EngineConfig(memory_budget="64MiB", num_kv_blocks=100, **SMALL)
    plan = plan_memory(cfg, MCFG, "cpu", 1 << 20, 1 << 16, 4, False, total=1 << 40)
    assert plan.num_kv_blocks == 100
    cfg = EngineConfig(memory_budget="64MiB", **SMALL)
    plan = plan_memory(cfg, MCFG, "cpu", 1 << 20, 1 << 16, 4, False, 1 << 40, 20 << 20)
    assert plan.library_pool >= 20 << 20 and plan.library_pool - (20 << 20) < 1 << 16


@pytest.mark.parametrize(
    "weights, budget, blocks, part",
    [
        (100 << 20, "64MiB", None, "weights"),  # the model alone is over
        (1 << 20, "1200KiB", None, "activations"),
        (1 << 20, "8MiB", 1000, "kv_blocks"),  # asked-for blocks do not fit
        (1 << 20, "2MiB", None, "kv_blocks"),  # fewer blocks than one step's tokens
    ],
)
def test_a_part_that_does_not_fit_is_a_typed_error(weights, budget, blocks, part):
    cfg = EngineConfig(memory_budget=budget, num_kv_blocks=blocks, **SMALL)
    with pytest.raises(MemoryBudgetError) as e:
        plan_memory(cfg, MCFG, "cpu", weights, 1 << 16, 4, False, total=1 << 40)
    assert e.value.part == part and "--" in str(e.value)  # names a flag to change


def test_few_blocks_asked_for_are_kept():
    """`moska library build` asks for 16 blocks: fewer than a full-context request is fine."""
    long_context = SimpleNamespace(**{**vars(MCFG), "max_position_embeddings": 1 << 16})
    cfg = EngineConfig(num_kv_blocks=16, device="cpu")
    plan = plan_memory(cfg, long_context, "cpu", 1 << 20, 1 << 16, 4, False, total=1 << 34)
    assert plan.num_kv_blocks == 16  # 16 x 16 tokens < the 65,536-token context


def test_llm_reports_its_plan():
    from moska import LLM

    llm = LLM(None, memory_budget="256MiB", num_kv_blocks=32, **SMALL)
    plan = llm.memory
    assert plan.budget == 256 << 20 and plan.num_kv_blocks == 32
    assert plan.kv_blocks == llm.engine.runner.cache.nbytes  # the accounted KV is allocated
    params = sum(p.numel() * p.element_size() for p in llm.engine.loaded.model.parameters())
    assert plan.weights >= params


def test_engine_with_a_tiny_budget_fails_at_startup():
    from moska.engine.llm_engine import LLMEngine

    with pytest.raises(MemoryBudgetError, match="gpu-memory-utilization"):
        LLMEngine.from_model(None, memory_budget="4MiB", **SMALL)


def test_cli_reports_one_line_and_exits_2(capsys):
    from moska.cli import main

    argv = ["generate", "hi", "--device", "cpu", "--memory-budget", "4MiB", "--max-tokens", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moska: error: out of device memory"), err


@pytest.fixture(scope="module")
def library_setup(tmp_path_factory):
    """A library on disk, and the plan of an engine whose library cache is half its size."""
    from moska.engine.llm_engine import LLMEngine

    root = tmp_path_factory.mktemp("libs")
    big = LLMEngine.from_model(None, library_root=str(root), num_kv_blocks=16, **SMALL)
    big.libraries.build("docs", [("a", "hello library " * 10)], chunk_size=64)
    big.libraries.unload("docs")
    lib = big.libraries.get("docs")
    plan = big.runner.memory_plan
    fixed = plan.weights + plan.activations + plan.kv_blocks
    return root, lib, fixed


def test_library_bytes_estimate_matches_the_loaded_library(library_setup):
    _, lib, _ = library_setup
    assert library_device_bytes(lib.manifest) == lib.nbytes


def test_fp8_library_bytes_estimate_counts_its_per_token_scales(library_setup):
    from moska.engine.llm_engine import LLMEngine
    from moska.library import load_library

    root, _, _ = library_setup
    eng = LLMEngine.from_model(None, library_root=str(root), num_kv_blocks=16, **SMALL)
    eng.libraries.build("docs8", [("a", "hello library " * 10)], chunk_size=64, kv_dtype="fp8")
    fp8 = load_library(root, "docs8", None, "cpu", progress=False)
    assert fp8.kv_scale_pools and library_device_bytes(fp8.manifest) == fp8.nbytes


def test_library_over_the_cache_is_refused_before_loading(library_setup):
    from moska.engine.llm_engine import LLMEngine
    from moska.engine.sampling_params import SamplingParams
    from moska.server.app import create_app
    from moska.server.background import background_server
    from moska.server.settings import ServerSettings

    root, lib, fixed = library_setup
    budget = f"{fixed + lib.nbytes // 2}B"
    engine = LLMEngine.from_model(
        None, library_root=str(root), num_kv_blocks=16, memory_budget=budget, **SMALL
    )
    assert engine.runner.memory_plan.library_pool < lib.nbytes
    with pytest.raises(LibraryMemoryError, match="'docs' needs"):
        engine.add_request("r", "hi", SamplingParams(max_tokens=1), library="docs")
    assert engine.libraries.loaded_names() == [] and not engine.has_unfinished_requests()
    app = create_app(engine, ServerSettings())
    with background_server(app) as url:
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": engine.model_name, "prompt": "hi", "max_tokens": 1, "library": "docs"},
        )
    assert 400 <= r.status_code < 500, r.text
    assert "needs" in r.json()["error"]["message"]
    roomy = LLMEngine.from_model(
        None, library_root=str(root), num_kv_blocks=16, memory_budget=f"{fixed + 2 * lib.nbytes}B",
        **SMALL,
    )  # fmt: skip
    roomy.add_request("r", "hi", SamplingParams(max_tokens=1), library="docs")
    while roomy.has_unfinished_requests():
        roomy.step()
    assert roomy.libraries.loaded_names() == ["docs"]
