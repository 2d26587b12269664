"""What rank 0 sends the other ranks each step, so that they run the same forward.

Rank 0 owns the scheduler and the block manager; the other ranks own nothing but their
slice of the weights and of the KV cache. Before each call into the model rank 0 sends a
command: a fixed header of 8 int64 on a gloo *control* group (host memory; the other ranks
block on it while idle, so it has no useful timeout), then, if the command carries one,
a payload on the *model* group (NCCL on GPUs: device to device, so the token ids a decode
step reads from the previous step's sampled tokens never visit the host):

- FORWARD: token ids [T], positions [T], slot mapping [T], cu_q_lens [B+1], seq_lens [B]
  and block tables [B, max_blocks], packed into one int64 tensor. A decode step at
  B = 256 with 64 blocks per request: 256 * (3 + 2 + 64) + 1 ints = 141 KB.
- LOGITS_LAST: the logits of every row of the last forward (a decode step): no payload.
- LOGITS_ROWS: the logits of some hidden rows (prefill's last rows, prompt logprobs):
  the rows themselves [N, H] in the model's dtype.
- STOP: leave the loop.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch
import torch.distributed as dist

from moska.attention.metadata import AttentionMetadata
from moska.distributed.comm import Collectives
from moska.distributed.errors import TensorParallelConfigError

HEADER_LEN = 8


class Command(enum.IntEnum):
    FORWARD = 1
    LOGITS_LAST = 2
    LOGITS_ROWS = 3
    STOP = 4


class Received(NamedTuple):
    """One command as a rank other than 0 receives it."""

    command: Command
    input_ids: torch.Tensor | None = None  # [T] int64 (FORWARD)
    positions: torch.Tensor | None = None  # [T] int64 (FORWARD)
    meta: AttentionMetadata | None = None  # FORWARD
    hidden: torch.Tensor | None = None  # [N, H] (LOGITS_ROWS)


class StepChannel:
    """Rank 0 sends with send_*; the other ranks call recv() in a loop."""

    def __init__(
        self,
        comm: Collectives,
        control_group,
        device: torch.device,
        hidden_size: int,
        dtype: torch.dtype,
    ) -> None:
        self.comm = comm
        self.control_group = control_group
        self.device = device
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.steps = 0

    # ---- rank 0 ----------------------------------------------------------------------
    def _header(self, command: Command, *fields: int) -> None:
        values = [int(command), *fields]
        header = torch.tensor(values + [0] * (HEADER_LEN - len(values)), dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.control_group)

    def send_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> None:
        meta: AttentionMetadata | None = getattr(attn, "meta", None)
        if meta is None:
            raise TensorParallelConfigError(
                "with tensor parallelism the model runs only inside the engine's steps "
                "(library builds and prefills are not supported yet); use "
                "tensor_parallel_size=1 for them"
            )
        if meta.groups:
            raise TensorParallelConfigError(
                "library (shared KV) requests do not run with tensor parallelism yet; "
                "serve libraries with tensor_parallel_size=1"
            )
        t, b = input_ids.numel(), meta.seq_lens.numel()
        max_blocks = meta.block_tables.shape[1]
        self.steps += 1
        self._header(Command.FORWARD, t, b, max_blocks, int(meta.decode_only), self.steps)
        payload = torch.cat(
            [
                input_ids.long(),
                positions.long(),
                meta.slot_mapping.long(),
                meta.cu_q_lens.long(),
                meta.seq_lens.long(),
                meta.block_tables.long().flatten(),
            ]
        )  # [3T + 2B + 1 + B * max_blocks] int64
        self.comm.broadcast(payload)

    def send_logits(self, hidden: torch.Tensor, *, same_as_forward: bool) -> None:
        if same_as_forward:
            self._header(Command.LOGITS_LAST)
            return
        self._header(Command.LOGITS_ROWS, hidden.shape[0])
        self.comm.broadcast(hidden.contiguous())

    def send_stop(self) -> None:
        self._header(Command.STOP)

    # ---- the other ranks -------------------------------------------------------------
    def recv(self) -> Received:
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.control_group)
        command, *fields = header.tolist()
        command = Command(command)
        if command is Command.FORWARD:
            t, b, max_blocks, decode_only, step = fields[:5]
            self.steps = step
            n = 3 * t + 2 * b + 1 + b * max_blocks
            payload = self.comm.broadcast(torch.empty(n, dtype=torch.int64, device=self.device))
            ids, pos, slots, cu_q, seq_lens, tables = payload.split(
                [t, t, t, b + 1, b, b * max_blocks]
            )
            meta = AttentionMetadata(
                slot_mapping=slots,
                cu_q_lens=cu_q.int(),
                seq_lens=seq_lens.int(),
                block_tables=tables.int().view(b, max_blocks),
                decode_only=bool(decode_only),
            )
            return Received(command, ids, pos, meta)
        if command is Command.LOGITS_ROWS:
            hidden = torch.empty(fields[0], self.hidden_size, dtype=self.dtype, device=self.device)
            return Received(command, hidden=self.comm.broadcast(hidden))
        return Received(command)
