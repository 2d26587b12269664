"""Runs a function on N CPU processes joined by a gloo process group, with a deadline.

Each test file starts its processes once and runs all its cases inside them. They are
forked from a forkserver that has imported torch once: spawning each one (a fresh
interpreter importing torch) took 9 s for 3 processes on a 2-core machine, forking 0.1 s. A rank that hangs or dies
fails the caller within ``timeout_s``: the processes are killed in ``finally``.
"""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback

import torch.multiprocessing as mp

# imported once by the forkserver instead of by every rank (1-5 s each on 2 loaded cores):
# the engine and the kernels' PyTorch references, which the ranks of the engine-level tests
# import lazily (torch._dynamo is no longer needed: models on meta skip the embedding's init)
PRELOAD = [
    "torch",
    "torch.distributed",
    # imported lazily by a model's first `to_empty` (torch._refs.empty_like), with sympy:
    # 0.9 s per rank on 2 cores
    "torch.fx.experimental.symbolic_shapes",
    "moska.engine.llm_engine",
    "moska.distributed.helix_engine",
    *(f"moska.kernels.{m}" for m in ("activation", "kv_write", "merge", "paged_attention",
                                     "paged_heads", "rms_norm", "rotary", "shared_attention")),
]  # fmt: skip


def _entry(fn, rank: int, world: int, store: str, results, collective_s: float, args) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # for kernels decorated from here on
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        backend = os.environ.get("MOSKA_TEST_BACKEND", "gloo")  # nccl: a logic run on a GPU
        if backend == "nccl":  # CUDA tensors over NCCL, host tensors (control) over gloo
            torch.cuda.set_device(rank % torch.cuda.device_count())
            # NCCL needs a GPU per rank ("Duplicate GPU detected"): more ranks than GPUs
            # stage through the host on gloo, a logic run
            many = world > torch.cuda.device_count()
            backend = "gloo" if many else "cpu:gloo,cuda:nccl"
        dist.init_process_group(
            backend,
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=collective_s),
        )
        results.put((rank, True, fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout_s: float = 60.0, collective_s: float = 20.0):
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; returns their results by rank.

    ``fn`` must be importable (module level). The children run the kernels' PyTorch
    references (TRITON_INTERPRET=0, also for the forkserver started here: launchers fall back to them on the CPU), which is much
    faster than Triton's interpreter at these shapes. On a GPU machine,
    MOSKA_TEST_DEVICE=cuda (and MOSKA_TEST_BACKEND=nccl) run the cases on CUDA tensors
    with the Triton kernels. Raises AssertionError naming the rank
    on a failure, and TimeoutError when ``timeout_s`` passes first.
    """
    ctx = forkserver_context()
    results = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(prefix="moska-gloo-"), "store")
    procs = []
    finished = False
    try:
        for rank in range(world):
            p = ctx.Process(
                target=_entry, args=(fn, rank, world, store, results, collective_s, args)
            )
            p.start()
            procs.append(p)
        out: dict[int, object] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(out))} did not finish")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                dead = [i for i in dead if i not in out]
                if dead:
                    raise AssertionError(f"rank(s) {dead} died (exit codes) without a result")
                continue
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = value
        finished = True
        return [out[r] for r in range(world)]
    finally:
        for p in procs:  # after a failure the others may wait in a collective: no grace
            p.join(timeout=10 if finished else 0)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def forkserver_context():
    """The forkserver context, its server started (unless running) with PRELOAD imported and
    TRITON_INTERPRET=0, which every child forked from it inherits: the kernels are decorated
    without the interpreter, so on the CPU their launchers run the PyTorch references. The
    engine tests' ranks (tests/distributed/conftest.py) and `run_ranks` fork from it."""
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        forkserver.ensure_running()  # the server's environment is the one at its start
    finally:
        _restore(saved)
    return ctx


def _restore(saved: str | None) -> None:
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved
