"""Typed errors of the distributed runtime; each message says what happened and what to do."""

from __future__ import annotations


class TensorParallelConfigError(ValueError):
    """A tensor-parallel size this model cannot be split into, or a feature that does not
    run with tensor parallelism yet."""


class RankFailedError(RuntimeError):
    """A rank of the engine's process group died or stopped answering. The engine cannot
    run steps any more (its process group is broken): restart it. `rank` is None when a
    collective failed but no rank could be named."""

    def __init__(self, rank: int | None, reason: str) -> None:
        who = f"rank {rank}" if rank is not None else "a rank"
        super().__init__(
            f"tensor-parallel {who} failed: {reason}; the engine cannot run any more "
            "steps, restart it"
        )
        self.rank = rank
        self.reason = reason
