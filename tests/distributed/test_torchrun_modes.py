"""`torchrun --nproc-per-node N+M -m moska serve MODEL --tensor-parallel-size N
--shared-kv-ranks M`: every rank runs the same line; rank 0 serves, ranks 1..N-1 run its
forwards as TP ranks, ranks N.. hold the library's chunks, and all leave when it stops. As
in test_torchrun_launch.py, processes forked from gloo_ranks' forkserver get the
environment torchrun gives its workers and run the same `LLM(...)` line: rank 0's greedy
tokens reading a library equal one process's (N = 2, M = 1; and N = 1, M = 1), every other
rank leaves with SystemExit(0)."""

from __future__ import annotations

import os
import queue
import time

import pytest
import torch
from gloo_ranks import forkserver_context
from test_torchrun_launch import _free_port
from tp_support import build_checkpoint

pytestmark = pytest.mark.timeout(60)  # a rank that hangs fails the test

KW = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 32}
PROMPTS = [[5, 6, 7, 8, 9], [40, 41]]


def _generate(llm) -> list[list[int]]:
    from moska.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, library="docs")]


def _torchrun_rank(rank: int, world: int, port: int, args: tuple, results) -> None:
    """One rank as torchrun starts it: its environment, then the user's line."""
    ckpt, root, tp, shared = args
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from moska.engine.llm import LLM

    torch.set_num_threads(1)  # torchrun's OMP_NUM_THREADS=1: ranks share the cores
    try:
        try:
            kw = {**KW, "library_root": root}
            llm = LLM(ckpt, tensor_parallel_size=tp, shared_kv_ranks=shared, **kw)
        except SystemExit as e:  # a rank other than 0, after rank 0 stopped
            results.put((rank, "exit", e.code))
            return
        try:
            got = _generate(llm)
        finally:
            llm.shutdown()
        results.put((rank, "tokens", got))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((rank, "error", repr(e)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(checkpoint, library root, one process's tokens reading library "docs")."""
    from moska.engine.llm import LLM

    base = tmp_path_factory.mktemp("trskv")
    ckpt, root = str(build_checkpoint(base / "ckpt", seed=4)), str(base / "libraries")
    ids = torch.randint(3, 256, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    with LLM(ckpt, library_root=root, **KW) as one:
        one.engine.libraries.progress = False
        one.engine.libraries.build("docs", [("a.txt", ids)], chunk_size=16)  # 4 chunks
        want = _generate(one)
    return ckpt, root, want


@pytest.mark.parametrize(("tp", "shared"), [(2, 1), (1, 1)])
def test_torchrun_ranks_read_a_library_like_one_process(model, tp, shared):
    ckpt, root, want = model
    world = tp + shared
    ctx = forkserver_context()
    results = ctx.Queue()
    port = _free_port()
    args = (ckpt, root, tp, shared)
    procs = [
        ctx.Process(target=_torchrun_rank, args=(r, world, port, args, results))
        for r in range(world)
    ]
    got: dict[int, tuple] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 50
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, kind, value = results.get(timeout=1.0)
            except queue.Empty:
                continue
            got[rank] = (kind, value)
        for p in procs:
            p.join(timeout=10)
        exitcodes = [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    assert got.get(0) == ("tokens", want), got
    for rank in range(1, world):  # served rank 0's forwards or chunks, then left
        assert got.get(rank) == ("exit", 0), got
    assert exitcodes == [0] * world
