"""Typed errors of the distributed runtime; each message says what happened and what to do."""

from __future__ import annotations


class TensorParallelConfigError(ValueError):
    """A tensor-parallel size this model cannot be split into, or a feature that does not
    run with tensor parallelism yet."""


class TensorParallelBuildError(TensorParallelConfigError):
    """A library build on an engine with tensor_parallel_size > 1: a build runs the model
    outside the engine's steps, and each rank holds only its slice of the weights. Over
    HTTP a 400 (`tensor_parallel_build_error`) before any job is queued."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"library {name!r} cannot be built by an engine with tensor_parallel_size > 1 "
            "(a build runs the model outside the engine's steps, and each rank holds only "
            "its slice of the weights): build it on one process into the same library root "
            f"(`moska library build MODEL --name {name} --library-root ROOT FILES`, without "
            "--tensor-parallel-size), then request it by name: every rank loads its KV heads "
            "from the store"
        )
        self.name = name


class RankFailedError(RuntimeError):
    """A rank of the engine's process group died or stopped answering. The engine cannot
    run steps any more (its process group is broken): restart it. `rank` is None when a
    collective failed but no rank could be named."""

    def __init__(self, rank: int | None, reason: str) -> None:
        # "distributed": tensor-parallel, shared-KV, KV-parallel and Helix ranks alike
        who = f"distributed rank {rank}" if rank is not None else "a distributed rank"
        super().__init__(
            f"{who} failed: {reason}; the engine cannot run any more steps, restart it"
        )
        self.rank = rank
        self.reason = reason
