"""torchrun for the other distributed modes (tensor parallelism alone:
test_torchrun_launch.py): `torchrun --nproc-per-node N+M -m moska serve MODEL
--tensor-parallel-size N --shared-kv-ranks M` (rank 0 serves, ranks 1..N-1 run its forwards
as TP ranks, ranks N.. hold the library's chunks), `--decode-context-parallel-size P` and
`--helix`: every rank runs the same line and all leave when rank 0 stops. As in
test_torchrun_launch.py, processes forked from gloo_ranks' forkserver get the environment
torchrun gives its workers and run the same `LLM(...)` line: rank 0's greedy tokens equal
one process's (reading a library with shared-KV ranks), every other rank leaves with
SystemExit(0)."""

from __future__ import annotations

import pytest
import torch
from torchrun_support import run_ranks, set_torchrun_env
from tp_support import build_checkpoint

pytestmark = pytest.mark.timeout(60)  # a rank that hangs fails the test

KW = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 32}
PROMPTS = [[5, 6, 7, 8, 9], [40, 41]]


# name: (engine arguments, processes, reads the library)
MODES = {
    "tp2+shared1": ({"tensor_parallel_size": 2, "shared_kv_ranks": 1}, 3, True),
    "shared1": ({"shared_kv_ranks": 1}, 2, True),
    "dcp2": ({"decode_context_parallel_size": 2}, 2, False),
    "helix2": ({"decode_context_parallel_size": 2, "helix": True}, 2, False),
}


def _generate(llm, library: bool) -> list[list[int]]:
    from moska.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    lib = "docs" if library else None
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, library=lib)]


def _torchrun_rank(rank: int, world: int, port: int, args: tuple, results) -> None:
    """One rank as torchrun starts it: its environment, then the user's line."""
    ckpt, root, mode = args
    engine, _, library = MODES[mode]
    set_torchrun_env(rank, world, port)
    from moska.engine.llm import LLM

    torch.set_num_threads(1)  # torchrun's OMP_NUM_THREADS=1: ranks share the cores
    try:
        try:
            kw = {**KW, "library_root": root}
            llm = LLM(ckpt, **engine, **kw)
        except SystemExit as e:  # a rank other than 0, after rank 0 stopped
            results.put((rank, "exit", e.code))
            return
        try:
            got = _generate(llm, library)
        finally:
            llm.shutdown()
        results.put((rank, "tokens", got))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((rank, "error", repr(e)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(checkpoint, library root, one process's tokens {reads the library: tokens})."""
    from moska.engine.llm import LLM

    base = tmp_path_factory.mktemp("trskv")
    ckpt, root = str(build_checkpoint(base / "ckpt", seed=4)), str(base / "libraries")
    ids = torch.randint(3, 256, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    with LLM(ckpt, library_root=root, **KW) as one:
        one.engine.libraries.progress = False
        one.engine.libraries.build("docs", [("a.txt", ids)], chunk_size=16)  # 4 chunks
        want = {lib: _generate(one, lib) for lib in (True, False)}
    return ckpt, root, want


@pytest.mark.parametrize("mode", list(MODES))
def test_torchrun_ranks_generate_like_one_process(model, mode):
    ckpt, root, want = model
    _, world, library = MODES[mode]
    got, exitcodes = run_ranks(_torchrun_rank, world, (ckpt, root, mode))
    assert got.get(0) == ("tokens", want[library]), got
    for rank in range(1, world):  # served rank 0's forwards or chunks, then left
        assert got.get(rank) == ("exit", 0), got
    assert exitcodes == [0] * world
