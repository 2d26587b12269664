"""`torchrun --nproc-per-node 2 -m moska serve MODEL --tensor-parallel-size 2` (#18 item 1):
every rank runs the same line; rank 0 serves, the others run its forwards and exit when it
stops. torchrun itself would cost a fresh interpreter per rank (seconds of importing torch),
so two processes forked from gloo_ranks' forkserver get the environment torchrun gives its
workers and run the same `LLM(...)` line: rank 0's greedy tokens equal one process's and
rank 1 leaves with SystemExit(0) once rank 0 shuts down."""

from __future__ import annotations

import pytest
from torchrun_support import run_ranks, set_torchrun_env
from tp_support import build_checkpoint

pytestmark = pytest.mark.timeout(60)  # a rank that hangs fails the test

KW = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 16}
PROMPTS = [[5, 6, 7, 8, 9], [40, 41]]


def _params():
    from moska.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _torchrun_rank(rank: int, world: int, port: int, args: tuple, results) -> None:
    """One rank as torchrun starts it: its environment, then the user's line."""
    (ckpt,) = args
    set_torchrun_env(rank, world, port)
    from moska.engine.llm import LLM

    try:
        try:
            llm = LLM(ckpt, tensor_parallel_size=2, **KW)
        except SystemExit as e:  # a rank other than 0, after rank 0 stopped
            results.put((rank, "exit", e.code))
            return
        try:
            got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params())]
        finally:
            llm.shutdown()
        results.put((rank, "tokens", got))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((rank, "error", repr(e)))


def test_torchrun_ranks_generate_like_one_process(tmp_path):
    from moska.engine.llm import LLM

    ckpt = str(build_checkpoint(tmp_path / "ckpt"))
    with LLM(ckpt, **KW) as one:
        want = [o.outputs[0].token_ids for o in one.generate(PROMPTS, _params())]
    got, exitcodes = run_ranks(_torchrun_rank, 2, (ckpt,))
    assert got.get(0) == ("tokens", want), got
    assert got.get(1) == ("exit", 0), got  # served rank 0's forwards, then left
    assert exitcodes == [0, 0]
