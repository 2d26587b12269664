"""What rank 0 sends the other ranks each step, so that they run the same forward.

Rank 0 owns the scheduler and the block manager; the other ranks own nothing but their
slice of the weights and of the KV cache. Before each call into the model rank 0 sends a
command as one *control message* on a gloo group (host memory; the other ranks block on it
while idle, so their side has no timeout; rank 0's has, and a rank that stops answering is a
RankFailedError: runtime.control_timeout_s): a header of HEADER_LEN int64 and room for a
payload after it (its layout, the commands and what each carries: `control_message.py`).
Every message has the same length on every rank, `capacity`, which each message's header
sets for the next one; rank 0 sizes it from the last payload (1.25x it, rounded up to a
power of two, within [MIN_CAPACITY, MAX_CAPACITY]), so a decode step's metadata, whose
size changes slowly, fits in the message of its header: **one collective per step**. A
payload that does not fit follows in a second message of its own length (named in the
header), and the next message grows.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from moska.attention.metadata import AttentionMetadata, LibraryGroup
from moska.distributed.comm import Collectives
from moska.distributed.control_message import (
    FOLLOW_LOGITS,
    FOLLOW_TOKENS,
    FOLLOWS,
    HEADER_LEN,
    INLINE,
    LEN_AT,
    MIN_CAPACITY,
    NEXT_AT,
    NO_PAYLOAD,
    WHERE_AT,
    Command,
    Received,
    next_capacity,
)
from moska.distributed.errors import RankFailedError, TensorParallelConfigError


class StepChannel:
    """Rank 0 sends with send_*; the other ranks call recv() in a loop."""

    def __init__(
        self,
        comm: Collectives | None,  # None: a rank outside the model's group (shared-KV)
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
        self.capacity = MIN_CAPACITY  # int64 of the next control message, the same on all
        # a receiver on a GPU takes control messages into pinned memory, so that copying
        # their payload to the device does not wait for the device (a graph in flight)
        self._pin = device.type == "cuda"
        self._payload: torch.Tensor | None = None  # rank 0: host payload of the next header
        # rank 0: what a forward's logits_follow announced and was not asked for yet (0: none)
        self.logits_due = 0
        # rank 0: the library builds the other ranks hold (build id -> name)
        self.worker_builds: dict[str, str] = {}
        self._lock = threading.RLock()  # one command's messages are never interleaved
        self.failure: RankFailedError | None = None  # the control group broke (_control)

    @contextlib.contextmanager
    def _control(self, what: str) -> Iterator[None]:
        """Around a wait on the control group: its failure (a gloo timeout, rank 0's side
        being bounded by MOSKA_DIST_CONTROL_TIMEOUT_S, or a peer's closed socket) is a
        RankFailedError naming the command, kept in `failure`: a rank stopped answering, and
        the ranks no longer agree on where they are in the protocol (no STOP can reach them:
        the runtime kills them)."""
        try:
            yield
        except RuntimeError as e:  # dist.DistError included
            why = f"a rank stopped answering on the control group during {what} ({e})"
            self.failure = RankFailedError(None, why)
            raise self.failure from e

    @property
    def _comm(self) -> Collectives:
        """The model group's collectives (rank 0 and the tensor-parallel ranks)."""
        if self.comm is None:
            raise RuntimeError("this rank is not in the model's group")
        return self.comm

    @property
    def lock(self) -> threading.RLock:
        """Held while one command's messages (and answers) go out."""
        return self._lock

    # ---- rank 0 ----------------------------------------------------------------------
    def _header(self, command: Command, *fields: int) -> None:
        """One control message: the header, and the host payload set in `_payload` (in
        the message if it fits, else in a message of its own right after)."""
        payload, self._payload = self._payload, None
        if command is Command.STOP:  # shutdown goes out whatever was left half-done
            self.logits_due = 0
        if self.logits_due:  # the other ranks are in the logits gather: nothing else fits
            raise RuntimeError(
                f"{command.name} sent while the other ranks wait for the logits of the last "
                "forward (it said logits_follow): compute_logits must come first"
            )
        if len(fields) >= LEN_AT:
            raise ValueError(f"{command.name}: {len(fields)} header fields, at most {LEN_AT - 1}")
        n = 0 if payload is None else payload.numel()
        where = NO_PAYLOAD
        if payload is not None:
            where = INLINE if HEADER_LEN + n <= self.capacity else FOLLOWS
        nxt = self.capacity if payload is None else next_capacity(n)
        head = [int(command), *fields] + [0] * (LEN_AT - 1 - len(fields)) + [n, where, nxt, 0]
        msg = torch.empty(self.capacity, dtype=torch.int64)
        msg[:HEADER_LEN] = torch.tensor(head, dtype=torch.int64)
        if where == INLINE:
            assert payload is not None
            msg[HEADER_LEN : HEADER_LEN + n] = payload
        with self._control(command.name):
            dist.broadcast(msg, src=0, group=self.control_group)
            self.capacity = nxt
            if where == FOLLOWS:
                assert payload is not None
                dist.broadcast(payload.contiguous(), src=0, group=self.control_group)

    def _send_bytes(self, text: bytes) -> None:
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        with self._control("a command's JSON"):
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

    def agree(self, why_not: str | None) -> dict[int, str]:
        """Every rank says whether it can go on (None) or why not, and every rank gets all
        the answers (one all_gather_object): rank -> why not. GRAPH_CAPTURE asks this
        before any rank runs a collective of the capture."""
        answers: list[Any] = [None] * dist.get_world_size(self.control_group)
        with self._control("the ranks' agreement (GRAPH_CAPTURE)"):
            dist.all_gather_object(answers, why_not, group=self.control_group)
        return {r: a for r, a in enumerate(answers) if a is not None}

    def answers(self) -> dict[int, str]:
        """Every rank's answer to the command just sent (GRAPH_CAPTURE): rank -> why not."""
        return self._answers()

    def _answers(self) -> dict[int, str]:
        """Every rank's answer to the command just sent: rank -> why it failed."""
        answers: list[Any] = [None] * dist.get_world_size(self.control_group)
        with self._control("the ranks' answers to the last command"):
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

    def send_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn, logits_follow: int = 0
    ) -> None:
        """The forward's inputs; `logits_follow`: rank 0 asks next for the logits (or the
        greedy tokens) of every row of this forward, so no LOGITS_LAST is sent."""
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
        on_host = self._comm.stage_through_host  # gloo: in the control message
        with self._lock:
            self.steps += 1
            text = json.dumps(groups).encode() if groups else b""
            self._payload = payload.cpu() if on_host else None
            fields = (len(text), t, b, max_blocks, int(meta.decode_only), self.steps)
            self._header(Command.FORWARD, *fields, int(logits_follow))
            if text:
                self._send_bytes(text)
            if not on_host:  # NCCL: device to device
                self._comm.broadcast(payload)
            self.logits_due = int(logits_follow)

    def send_graph_step(
        self,
        bucket: int,
        positions: torch.Tensor,
        slots: torch.Tensor,
        seq_lens: torch.Tensor,
        tables: torch.Tensor,
        logits_follow: int,
    ) -> None:
        """Replay the decode graph of `bucket` for len(positions) rows: the host inputs
        [n] and tables [n, W] in one control message (the token ids travel in the graph)."""
        n, w = positions.numel(), tables.shape[1]
        parts = (positions, slots, seq_lens, tables.flatten())
        with self._lock:
            self.steps += 1
            self._payload = torch.cat([p.long().cpu() for p in parts])  # [3n + n * W]
            self._header(Command.GRAPH_STEP, bucket, n, w, self.steps, int(logits_follow))
            self.logits_due = int(logits_follow)

    def send_graph_capture(self, bucket: int) -> None:
        """Capture the decode graph of `bucket` now; answers() follows the capture."""
        with self._lock:
            self._header(Command.GRAPH_CAPTURE, bucket)

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

    def take_tokens(self, *, same_as_forward: bool) -> bool:
        """Whether the last forward announced FOLLOW_TOKENS for these rows (the other ranks
        are in the greedy gather now); False: ask for the logits instead (send_logits)."""
        with self._lock:
            if same_as_forward and self.logits_due == FOLLOW_TOKENS:
                self.logits_due = 0
                return True
            return False

    def send_logits(self, hidden: torch.Tensor, *, same_as_forward: bool) -> None:
        with self._lock:
            if same_as_forward and self.logits_due == FOLLOW_LOGITS:  # announced by the header
                self.logits_due = 0
                return
            if same_as_forward:
                self._header(Command.LOGITS_LAST)
                return
            self._header(Command.LOGITS_ROWS, hidden.shape[0])
            self._comm.broadcast(hidden.contiguous())

    def send_stop(self) -> None:
        with self._lock:
            self._header(Command.STOP)

    # ---- the other ranks -------------------------------------------------------------
    def recv(self) -> Received:
        msg = torch.empty(self.capacity, dtype=torch.int64, pin_memory=self._pin)
        dist.broadcast(msg, src=0, group=self.control_group)
        head = msg[:HEADER_LEN].tolist()  # a host tensor: no device sync
        command, fields = Command(head[0]), head[1:LEN_AT]
        n, where, self.capacity = head[LEN_AT], head[WHERE_AT], head[NEXT_AT]
        host: torch.Tensor | None = None  # the host payload
        if where == INLINE:
            host = msg[HEADER_LEN : HEADER_LEN + n]
        elif where == FOLLOWS:
            host = torch.empty(n, dtype=torch.int64, pin_memory=self._pin)
            dist.broadcast(host, src=0, group=self.control_group)
        if command is Command.GRAPH_STEP:
            assert host is not None
            bucket, rows, width, self.steps, follow = fields[:5]
            pos, slots, seq_lens, tables = host.split([rows, rows, rows, rows * width])
            meta = AttentionMetadata(  # int64 views of the (pinned) message, on the host
                slot_mapping=slots,
                cu_q_lens=torch.arange(rows + 1, dtype=torch.int32),
                seq_lens=seq_lens,
                block_tables=tables.view(rows, width),
                decode_only=True,
            )
            return Received(command, positions=pos, meta=meta, logits_follow=follow, bucket=bucket)
        if command is Command.GRAPH_CAPTURE:
            return Received(command, bucket=fields[0])
        if command is Command.FORWARD:
            text_len, t, b, max_blocks, decode_only, step, follow = fields[:7]
            self.steps = step
            groups = self._recv_json(text_len) if text_len else []
            if self.comm is None:  # a shared-KV rank beside tensor parallelism: the groups
                none = torch.empty(0, dtype=torch.int64)  # their rows are not theirs
                return Received(command, groups=[(g, none) for g in groups])
            sizes = [g["n"] for g in groups]
            n = 3 * t + 2 * b + 1 + b * max_blocks + sum(sizes)
            if host is not None:  # gloo: it came in the control message
                payload = host.to(self.device)
            else:
                empty = torch.empty(n, dtype=torch.int64, device=self.device)
                payload = self.comm.broadcast(empty)
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
            return Received(
                command, ids, pos, meta, groups=list(zip(groups, rows)), logits_follow=follow
            )
        if command in (
            Command.LOAD_LIBRARY,
            Command.UNLOAD_LIBRARY,
            Command.SHARED_STEP,
            Command.PLACE_LIBRARY,
        ):
            return Received(command, info=self._recv_json(fields[0]))
        if command is Command.LOGITS_ROWS and self.comm is not None:
            hidden = torch.empty(fields[0], self.hidden_size, dtype=self.dtype, device=self.device)
            return Received(command, hidden=self.comm.broadcast(hidden))
        return Received(command)

    def _recv_json(self, n: int) -> Any:
        data = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.control_group)
        return json.loads(bytes(data.numpy()).decode())

    def answer_load(self, error: str | None) -> None:
        """A rank other than 0: its answer to LOAD_LIBRARY or GRAPH_CAPTURE (None: done)."""
        dist.gather_object(error, None, dst=0, group=self.control_group)

    answer = answer_load
