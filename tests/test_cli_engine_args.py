"""CLI engine flags reach EngineConfig; on CPU the runner has no CUDA graphs and no scratch
KV block (the graphs' padding target exists only on CUDA)."""

from moska import LLM
from moska.cli import _engine_kwargs, build_parser


def test_enforce_eager_flag_reaches_the_engine_config():
    parser = build_parser()
    args = parser.parse_args(["generate", "hi", "--enforce-eager", "--device", "cpu"])
    assert _engine_kwargs(args)["enforce_eager"] is True
    args = parser.parse_args(["serve", "--device", "cpu"])
    assert _engine_kwargs(args)["enforce_eager"] is False


def test_cpu_runner_is_eager_and_owns_every_block():
    llm = LLM(None, device="cpu", num_kv_blocks=64)
    runner = llm.engine.runner
    assert runner.graphs is None
    assert runner.num_blocks == runner.cache.num_blocks == 64
    assert llm.engine.capture_graphs(progress=False) == 0  # serve's pre-capture: a no-op here
