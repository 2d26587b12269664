"""What rank 0 sends the other ranks each step, so that they run the same forward.

Rank 0 owns the scheduler and the block manager; the other ranks own nothing but their
slice of the weights and of the KV cache. Before each call into the model rank 0 sends a
command: a fixed header of 8 int64 on a gloo *control* group (host memory; the other ranks
block on it while idle, so it has no useful timeout), then, if the command carries one,
a payload on the *model* group (NCCL on GPUs: device to device, so the token ids a decode
step reads from the previous step's sampled tokens never visit the host):

- FORWARD: token ids [T], positions [T], slot mapping [T], cu_q_lens [B+1], seq_lens [B]
  and block tables [B, max_blocks], packed into one int64 tensor. A decode step at
  B = 256 with 64 blocks per request: 256 * (3 + 2 + 64) + 1 ints = 141 KB. A step with
  library rows adds their row indices to the payload ([n] int64 per group) and, on the
  control group, a JSON list of the groups (build id, rows, top_k, scorer, routing policy:
  ~250 bytes per group).
- LOAD_LIBRARY: a JSON {root, name, build id} on the control group; every rank loads its
  KV heads of that build from the store and answers (gather_object): None or why not.
- UNLOAD_LIBRARY: a JSON {build id}: drop it (no request reads it any more).
- LOGITS_LAST: the logits of every row of the last forward (a decode step): no payload.
- LOGITS_ROWS: the logits of some hidden rows (prefill's last rows, prompt logprobs):
  the rows themselves [N, H] in the model's dtype.
- STOP: leave the loop.
"""

from __future__ import annotations

import enum
import json
import threading
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from moska.attention.metadata import AttentionMetadata, LibraryGroup
from moska.distributed.comm import Collectives
from moska.distributed.errors import TensorParallelConfigError

HEADER_LEN = 8


class Command(enum.IntEnum):
    FORWARD = 1
    LOGITS_LAST = 2
    LOGITS_ROWS = 3
    STOP = 4
    LOAD_LIBRARY = 5
    UNLOAD_LIBRARY = 6
    SHARED_STEP = 7  # shared-KV ranks: the builds of a forward's groups (shared_kv_engine.py)
    PLACE_LIBRARY = 8  # shared-KV ranks: a build's new chunk placement (hot-chunk replicas)


class Received(NamedTuple):
    """One command as a rank other than 0 receives it."""

    command: Command
    input_ids: torch.Tensor | None = None  # [T] int64 (FORWARD)
    positions: torch.Tensor | None = None  # [T] int64 (FORWARD)
    meta: AttentionMetadata | None = None  # FORWARD
    hidden: torch.Tensor | None = None  # [N, H] (LOGITS_ROWS)
    # FORWARD: [(group JSON, rows [n] int64)] of its library groups; LOAD/UNLOAD: the JSON
    groups: list[tuple[dict, torch.Tensor]] | None = None
    info: dict | None = None


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
        # rank 0: the library builds the other ranks hold (build id -> name)
        self.worker_builds: dict[str, str] = {}
        self._lock = threading.RLock()  # one command's messages are never interleaved

    # ---- rank 0 ----------------------------------------------------------------------
    def _header(self, command: Command, *fields: int) -> None:
        values = [int(command), *fields]
        header = torch.tensor(values + [0] * (HEADER_LEN - len(values)), dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.control_group)

    def _send_bytes(self, text: bytes) -> None:
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.control_group)

    def _json_header(self, command: Command, obj: Any) -> None:
        """A header whose first field is the length of the JSON that follows it."""
        text = json.dumps(obj).encode()
        self._header(command, len(text))
        self._send_bytes(text)

    def send_load_library(self, root: str, name: str, build_id: str) -> None:
        """Have every other rank load its KV heads of `name`'s build `build_id` from the
        store at `root`; raises WorkerLibraryError naming the ranks that could not."""
        from moska.distributed.tp_library import WorkerLibraryError

        with self._lock:
            self._json_header(Command.LOAD_LIBRARY, {"root": root, "name": name, "build": build_id})
            failed = self._answers()
            if failed:  # the ranks that did load it drop it
                self._json_header(Command.UNLOAD_LIBRARY, {"build": build_id})
                why = "; ".join(f"rank {r}: {a}" for r, a in sorted(failed.items()))
                raise WorkerLibraryError(
                    f"tensor-parallel ranks could not load library {name!r} ({why}); the "
                    "request was not admitted: check the library (`moska library ls`), "
                    "rebuild it if it is damaged, and send the request again"
                )
            self.worker_builds[build_id] = name

    def _answers(self) -> dict[int, str]:
        """Every rank's answer to the command just sent: rank -> why it failed."""
        answers: list[Any] = [None] * dist.get_world_size(self.control_group)
        dist.gather_object(None, answers, dst=0, group=self.control_group)
        return {r: a for r, a in enumerate(answers) if a is not None}

    def send_place_library(self, root: str, name: str, build_id: str, holders: list) -> None:
        """Shared-KV ranks: hold `holders[c]` (shared rank indices) of each chunk c of the
        build from now on; raises WorkerLibraryError naming the ranks that could not."""
        from moska.distributed.tp_library import WorkerLibraryError

        with self._lock:
            info = {"root": root, "name": name, "build": build_id, "holders": holders}
            self._json_header(Command.PLACE_LIBRARY, info)
            failed = self._answers()
            if failed:
                why = "; ".join(f"rank {r}: {a}" for r, a in sorted(failed.items()))
                raise WorkerLibraryError(
                    f"shared-KV ranks could not place library {name!r}'s chunks ({why})"
                )

    def send_unload_library(self, build_id: str) -> None:
        with self._lock:
            self._json_header(Command.UNLOAD_LIBRARY, {"build": build_id})
            self.worker_builds.pop(build_id, None)

    def send_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> None:
        meta: AttentionMetadata | None = getattr(attn, "meta", None)
        if meta is None:
            raise TensorParallelConfigError(
                "with tensor parallelism the model runs only inside the engine's steps "
                "(library builds and prefills are not supported yet); use "
                "tensor_parallel_size=1 for them"
            )
        groups = [self._describe(g) for g in meta.groups]
        t, b = input_ids.numel(), meta.seq_lens.numel()
        max_blocks = meta.block_tables.shape[1]
        with self._lock:
            self.steps += 1
            text = json.dumps(groups).encode() if groups else b""
            self._header(
                Command.FORWARD, len(text), t, b, max_blocks, int(meta.decode_only), self.steps
            )
            if text:
                self._send_bytes(text)
            payload = torch.cat(
                [
                    input_ids.long(),
                    positions.long(),
                    meta.slot_mapping.long(),
                    meta.cu_q_lens.long(),
                    meta.seq_lens.long(),
                    meta.block_tables.long().flatten(),
                    *[g.rows.long() for g in meta.groups],
                ]
            )  # [3T + 2B + 1 + B * max_blocks + library rows] int64
            self.comm.broadcast(payload)

    def _describe(self, group: LibraryGroup) -> dict:
        """What the other ranks need of a library group (record and coverage stay on
        rank 0: reports of its own KV heads, no collective in them)."""
        lib = group.library
        if getattr(lib, "head_split", None) is None or lib.build_id not in self.worker_builds:
            raise TensorParallelConfigError(
                f"library {lib.name!r} was not acquired through the engine's library manager, "
                "so the other tensor-parallel ranks do not hold it; request it by name"
            )
        policy = group.policy
        return {
            "build": lib.build_id,
            "n": int(group.rows.numel()),
            "top_k": int(group.top_k),
            "scorer": group.scorer,
            "policy": None if policy is None else policy.to_dict(),
            "all_rows": bool(group.all_rows),
        }

    def send_logits(self, hidden: torch.Tensor, *, same_as_forward: bool) -> None:
        with self._lock:
            if same_as_forward:
                self._header(Command.LOGITS_LAST)
                return
            self._header(Command.LOGITS_ROWS, hidden.shape[0])
            self.comm.broadcast(hidden.contiguous())

    def send_stop(self) -> None:
        with self._lock:
            self._header(Command.STOP)

    # ---- the other ranks -------------------------------------------------------------
    def recv(self) -> Received:
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.control_group)
        command, *fields = header.tolist()
        command = Command(command)
        if command is Command.FORWARD:
            text_len, t, b, max_blocks, decode_only, step = fields[:6]
            self.steps = step
            groups = self._recv_json(text_len) if text_len else []
            sizes = [g["n"] for g in groups]
            n = 3 * t + 2 * b + 1 + b * max_blocks + sum(sizes)
            payload = self.comm.broadcast(torch.empty(n, dtype=torch.int64, device=self.device))
            ids, pos, slots, cu_q, seq_lens, tables, *rows = payload.split(
                [t, t, t, b + 1, b, b * max_blocks, *sizes]
            )
            meta = AttentionMetadata(
                slot_mapping=slots,
                cu_q_lens=cu_q.int(),
                seq_lens=seq_lens.int(),
                block_tables=tables.int().view(b, max_blocks),
                decode_only=bool(decode_only),
            )
            return Received(command, ids, pos, meta, groups=list(zip(groups, rows)))
        if command in (
            Command.LOAD_LIBRARY,
            Command.UNLOAD_LIBRARY,
            Command.SHARED_STEP,
            Command.PLACE_LIBRARY,
        ):
            return Received(command, info=self._recv_json(fields[0]))
        if command is Command.LOGITS_ROWS:
            hidden = torch.empty(fields[0], self.hidden_size, dtype=self.dtype, device=self.device)
            return Received(command, hidden=self.comm.broadcast(hidden))
        return Received(command)

    def _recv_json(self, n: int) -> Any:
        data = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.control_group)
        return json.loads(bytes(data.numpy()).decode())

    def answer_load(self, error: str | None) -> None:
        """A rank other than 0: its answer to LOAD_LIBRARY (None: loaded)."""
        dist.gather_object(error, None, dst=0, group=self.control_group)
