"""Helix in the engine (gloo, the tiny Llama: 4 query / 2 KV heads): 2 ranks (KVP 2 x TPA 1)
and 4 ranks (KVP 2 x TPA 2) run the real engine on rank 0 (scheduler, block manager over
KVP x each rank's blocks, the step channel) and `serve_helix` on the others, in forked gloo
processes (gloo_ranks.py: a deadline, so a hang fails). A request longer than one rank's
KV cache is served; its greedy tokens equal a one-process engine's, fp32 logits rel err <
1e-4; HOP-B (3 micro-batches) gives the tokens and logits of no HOP-B. At 4 ranks, with 2
micro-batches, a library's logits (every chunk; routed with scores exchanged between the
TPA groups) and greedy tokens equal one process's (2 ranks: test_helix_library.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from gloo_ranks import run_ranks
from helix_support import CHUNK, DOCS, LIB_PROMPTS, greedy_library, library_logits
from tp_support import build_checkpoint, engine_kwargs, greedy, prefill_logits, rel_err

from moska.distributed.helix import HelixConfigError, HelixLayout
from moska.model.config import ModelConfig

BLOCK = 16
LOCAL_BLOCKS = 4  # per rank: 64 tokens; the long prompt needs 6 blocks, 7 with its output
LONG = [int(t) for t in torch.randint(3, 256, (90,), generator=torch.Generator().manual_seed(5))]
SHORT = [7, 8, 9, 10, 11]


def _ranks(rank: int, world: int, path: str, kvp: int, hopb: list[int], lib_root=None) -> dict:
    import torch.distributed as dist

    from moska.config import EngineConfig
    from moska.distributed.comm import Collectives
    from moska.distributed.helix import HelixModel
    from moska.distributed.helix_engine import serve_helix
    from moska.distributed.helix_library import HelixLibraries
    from moska.distributed.step_channel import StepChannel
    from moska.engine.llm_engine import LLMEngine
    from moska.engine.scheduler import RequestTooLarge
    from moska.model import load_model

    control = dist.new_group(backend="gloo")
    comm = Collectives(None, rank, world, "gloo")
    kw = engine_kwargs("cpu", max_num_batched_tokens=48, max_num_seqs=8)
    small = {**kw, "num_kv_blocks": LOCAL_BLOCKS}
    tp = world if world > kvp else 1
    out: dict = {}
    if rank == 0 and lib_root is not None:  # built by one process, before the ranks read it
        ref_lib = LLMEngine.from_model(path, **kw, library_root=lib_root)
        ref_lib.libraries.progress = False
        ref_lib.libraries.build("docs", DOCS, chunk_size=CHUNK)
        out["ref_lib"] = _library_outputs(ref_lib)
    for mb in hopb:
        config = EngineConfig(
            model=path, **small, helix=True, decode_context_parallel_size=kvp,
            tensor_parallel_size=tp, helix_microbatches=mb,
        )  # fmt: skip
        if rank:
            serve_helix(comm, control, path, "float32", torch.device("cpu"), config)
            continue
        helix = HelixModel(comm, HelixLayout.from_engine(config), mb)
        loaded = load_model(path, dtype="float32", tensor_parallel=helix)
        channel = StepChannel(comm, control, torch.device("cpu"), 64, torch.float32)
        loaded.model.driver = channel
        libraries = None
        if lib_root is not None:
            split = helix.head_split(loaded.model)
            libraries = HelixLibraries(lib_root, loaded, torch.device("cpu"), channel, split)
        try:
            eng = LLMEngine(config, loaded, libraries)
            res = {"blocks": eng.runner.num_blocks, "cache": tuple(eng.runner.cache.k.shape)}
            before = eng.runner.attention.exchanges
            res["tokens"] = greedy(eng, [LONG, SHORT], 12)
            res["exchanges"] = eng.runner.attention.exchanges - before
            res["logits"] = prefill_logits(eng, [LONG[:70], SHORT])
            if lib_root is not None:
                res["lib"] = _library_outputs(eng)
        finally:
            channel.send_stop()
        out[mb] = res
    if rank == 0:  # one process: enough blocks (the reference), and one rank's budget
        ref = LLMEngine.from_model(path, **kw)  # both, as the helix engine above does
        out["ref_tokens"] = greedy(ref, [LONG, SHORT], 12)
        out["ref_logits"] = prefill_logits(ref, [LONG[:70], SHORT])
        try:
            greedy(LLMEngine.from_model(path, **small), [LONG], 12)
            out["one_rank"] = "served"
        except RequestTooLarge:
            out["one_rank"] = "refused"
    dist.barrier()
    return out


def _library_outputs(engine) -> dict:
    """Library logits read whole, and routed summing scores over KV heads (fixed k) and
    two-stage (both exchange scores between TPA groups); greedy tokens, routed."""
    from moska.routing.policy import LEGACY

    out = {f"logits_{k}": library_logits(engine, "docs", k, LEGACY) for k in (6, 2)}
    out["logits_two_stage"] = library_logits(engine, "docs", 2, LEGACY.replace(scorer="two_stage"))
    out["tokens"] = greedy_library(engine, "docs", 4, 2)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_checkpoint(tmp_path_factory.mktemp("helix") / "m", seed=4))


def _check(res: dict, kvp: int, tpa: int) -> None:
    assert res["one_rank"] == "refused"  # one rank's cache cannot hold the long request
    for mb in (k for k in res if isinstance(k, int)):
        got = res[mb]
        assert got["blocks"] == kvp * LOCAL_BLOCKS
        assert got["cache"][1:] == (LOCAL_BLOCKS, BLOCK, 2 // tpa, 16)  # its KV heads only
        assert got["tokens"] == res["ref_tokens"]
        assert len(got["tokens"]["g0"]) == 12 and len(got["tokens"]["g1"]) == 13
        assert got["exchanges"] > 0  # the layers went through the all-to-all
        assert got["logits"].shape == (75, 256)
        assert rel_err(got["logits"], res["ref_logits"]) < 1e-4


@pytest.mark.timeout(90)
def test_two_ranks_kvp2_hopb_on_and_off(checkpoint):
    res = run_ranks(_ranks, 2, checkpoint, 2, [1, 3], timeout_s=80)[0]
    _check(res, kvp=2, tpa=1)
    assert res[3]["tokens"] == res[1]["tokens"]
    assert rel_err(res[3]["logits"], res[1]["logits"]) < 1e-6


@pytest.mark.timeout(90)
def test_four_ranks_kvp2_tpa2_with_a_library(checkpoint, tmp_path):
    res = run_ranks(_ranks, 4, checkpoint, 2, [2], str(tmp_path / "libs"), timeout_s=80)[0]
    _check(res, kvp=2, tpa=2)
    got, want = res[2]["lib"], res["ref_lib"]
    for key in ("logits_6", "logits_2", "logits_two_stage"):
        assert got[key].shape == (sum(map(len, LIB_PROMPTS)), 256)
        assert rel_err(got[key], want[key]) < 1e-4, key
    assert rel_err(want["logits_2"], want["logits_6"]) > 1e-3  # routing dropped chunks
    assert got["tokens"] == want["tokens"] and len(got["tokens"]["lib0"]) == 4


def test_layout_heads_and_refusals():
    cfg = ModelConfig.from_dict(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4,
         "intermediate_size": 96, "vocab_size": 100, "num_hidden_layers": 1}
    )  # fmt: skip
    lay = HelixLayout(8, 2)  # KVP 2 x TPA 4
    # after the exchange every query head is on exactly one rank, inside its TPA group's
    seen = []
    for r in range(8):
        plan, (lo, hi) = lay.plan(cfg, r), lay.o_heads(cfg, r)
        assert plan.q_heads[0] <= lo < hi <= plan.q_heads[1]
        assert plan.kv_heads == (lay.tpa_index(r), lay.tpa_index(r) + 1)
        seen += range(lo, hi)
    assert seen == list(range(8))
    assert lay.kvp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(HelixConfigError, match=">= 2"):
        HelixLayout(8, 1)  # KVP 1 is tensor parallelism, not Helix
    with pytest.raises(HelixConfigError, match="divisible"):
        HelixLayout(16, 2).check(cfg)  # 16 ranks > 8 query heads
    with pytest.raises(HelixConfigError, match="multiple"):
        HelixLayout(6, 4)

    def engine(tp: int) -> SimpleNamespace:
        return SimpleNamespace(decode_context_parallel_size=4, tensor_parallel_size=tp)

    with pytest.raises(HelixConfigError, match="multiple"):  # not silently 4 ranks
        HelixLayout.from_engine(engine(2))
    assert HelixLayout.from_engine(engine(1)) == HelixLayout(4, 4)  # N = P
    assert HelixLayout.from_engine(engine(8)).tpa == 2
