"""The NCCL graph test's flow (test_tp_graphs.py::test_tp_graphs_nccl) on CPU: a 2-rank
engine from `LLMEngine.from_model(tensor_parallel_size=2)` whose worker is started by the
runtime (forked from the tests' forkserver) and enters through `run_worker`, decode graphs
forced on and their capture faked on both ranks (tp_support.fake_capture), StepChannel's
NCCL branch (payloads on the model group) and asynchronous scheduling, as on CUDA: every
bucket is captured ahead of traffic (`capture_graphs`, as `moska serve` does) by both
ranks, decode steps replay them, and greedy tokens equal one process's. The worker turns its graphs on
only if rank 0's environment reached it (Rendezvous.env), which is also checked."""

from __future__ import annotations

import pytest
from gloo_ranks import forkserver_context
from tp_support import build_checkpoint, fake_capture, fake_graphs_worker, greedy, nccl_path

pytestmark = pytest.mark.timeout(60)

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]
TOKENS = 6  # greedy() gives request i TOKENS + i: the batch shrinks 3 -> 2 -> 1


def test_engine_captures_ahead_and_replays_on_both_ranks(tmp_path, monkeypatch):
    from moska.distributed import worker
    from moska.engine.cuda_graphs import DecodeGraphs
    from moska.engine.llm_engine import LLMEngine
    from moska.engine.runner import ModelRunner

    path = build_checkpoint(tmp_path / "m")
    kw = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64, "max_num_seqs": 4,
          "enable_prefix_caching": False, "async_scheduling": True}  # fmt: skip
    want = greedy(LLMEngine.from_model(str(path), **kw, enforce_eager=True), PROMPTS, TOKENS)
    forkserver_context()  # running before the settings below: rank 1, forked from it, sees
    # them only through Rendezvous.env; short timeouts: a stuck rank fails in seconds
    monkeypatch.setenv("MOSKA_TEST_FAKE_GRAPHS", "1")
    monkeypatch.setenv("MOSKA_DIST_CONTROL_TIMEOUT_S", "20")
    monkeypatch.setenv("MOSKA_DIST_TIMEOUT_S", "20")
    monkeypatch.setattr(worker, "run_worker", fake_graphs_worker)
    monkeypatch.setattr(ModelRunner, "_use_graphs", lambda self, kv_parallel: True)
    monkeypatch.setattr(DecodeGraphs, "_capture", fake_capture)
    nccl_path(monkeypatch)  # payloads on the model group, as with NCCL (the worker's too)
    eng = LLMEngine.from_model(str(path), **kw, tensor_parallel_size=2)
    try:
        g = eng.runner.graphs
        assert type(g).__name__ == "TensorParallelGraphs"
        assert eng.capture_graphs(progress=False) == 3  # buckets 4, 2, 1: both ranks agreed
        assert sorted(g._graphs) == [(1,), (2,), (4,)]
        assert greedy(eng, PROMPTS, TOKENS) == want
        assert eng.runner.graphs is g and g.replays >= TOKENS  # no capture failed
        assert g.captures == 3  # decode steps replayed what was captured ahead
    finally:
        eng.shutdown()
