"""The collectives tensor parallelism uses, over one torch.distributed process group.

NCCL moves device tensors itself. Gloo is used on CPU, and also when several ranks share
one GPU (NCCL refuses two ranks on one device: "Duplicate GPU detected"); then a CUDA
tensor is staged through host memory, which is slow but exact — a logic run, not a speed
one. Every collective inherits the group's timeout (`init_process_group(timeout=...)`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Collectives:
    """all_reduce / broadcast / gather over `group` (None: the default group)."""

    def __init__(self, group, rank: int, world_size: int, backend: str) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.stage_through_host = backend == "gloo"

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        return t.cpu() if self.stage_through_host and t.is_cuda else t

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Sum (or `op`) `t` over the ranks, in place; returns `t`."""
        buf = self._staged(t)
        dist.all_reduce(buf, op=op, group=self.group)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_reduce_min(self, value: int) -> int:
        """The smallest `value` of all ranks (a host int; startup only)."""
        t = torch.tensor([value], dtype=torch.int64)
        if self.backend == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `t` into every rank's `t` (same shape and dtype), in place."""
        buf = self._staged(t)
        dist.broadcast(buf, src=src, group=self.group)
        if buf is not t:
            t.copy_(buf)
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `t` (equal shapes) on rank 0, in rank order; None on the others."""
        buf = self._staged(t.contiguous())
        parts = None
        if self.rank == 0:
            parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.gather(buf, parts, dst=0, group=self.group)
        if parts is not None and buf is not t:
            parts = [p.to(t.device) for p in parts]
        return parts
