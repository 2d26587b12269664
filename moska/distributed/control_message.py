"""The control message of the step channel (`step_channel.py`): its header layout, the
bounds of its capacity, the commands rank 0 sends and what a rank other than 0 receives.
What each command carries:

- FORWARD: token ids [T], positions [T], slot mapping [T], cu_q_lens [B+1], seq_lens [B]
  and block tables [B, max_blocks], packed into one int64 tensor. A decode step at
  B = 256 with 64 blocks per request: 256 * (3 + 2 + 64) + 1 ints = 141 KB. On gloo it
  rides in the control message; on NCCL it follows on the *model* group, device to device
  (the token ids a decode step reads from the previous step's sampled tokens never visit
  the host). A step with library rows adds their row indices to the payload ([n] int64
  per group) and, on the control group, a JSON list of the groups (build id, rows, top_k,
  scorer, routing policy: ~250 bytes per group). The header says what rank 0 will ask of
  every row right after (`logits_follow`: a decode step): their logits (FOLLOW_LOGITS), or
  only their argmax tokens (FOLLOW_TOKENS: every row greedy, so each rank sends [N, 2]
  (max, id) instead of its [N, V/n] logits), which the other ranks compute unasked.
- GRAPH_CAPTURE: capture the decode CUDA graph of a batch-size bucket (NCCL only,
  `distributed/tp_graphs.py`): every rank says whether it can (all_gather_object), then,
  if all can, captures, then answers (gather_object): None or why not.
- GRAPH_STEP: replay the bucket's graph for n rows: positions, slots, seq_lens [n] and
  block tables [n, W] in the control message (host data); the token ids are broadcast
  inside the graph.
- LOAD_LIBRARY: a JSON {root, name, build id} on the control group; every rank loads its
  KV heads of that build from the store and answers (gather_object): None or why not.
- UNLOAD_LIBRARY: a JSON {build id}: drop it (no request reads it any more).
- LOGITS_LAST: the logits of every row of the last forward (a forward that did not say
  logits_follow): no payload.
- LOGITS_ROWS: the logits of some hidden rows (prefill's last rows, prompt logprobs):
  the rows themselves [N, H] in the model's dtype.
- STOP: leave the loop.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch

from moska.attention.metadata import AttentionMetadata

HEADER_LEN = 16  # int64: the command, its fields (up to 11), then the three below
MIN_CAPACITY = 256  # int64 of a control message before any payload sized it (2 KiB)
MAX_CAPACITY = 1 << 16  # 512 KiB; a larger payload follows in a message of its own
LEN_AT, WHERE_AT, NEXT_AT = 12, 13, 14  # header: host payload length, where it is, next size
NO_PAYLOAD, INLINE, FOLLOWS = 0, 1, 2  # where: none on the control group, in it, after it
FOLLOW_LOGITS, FOLLOW_TOKENS = 1, 2  # logits_follow: every row's logits / greedy tokens next


def next_capacity(payload_len: int) -> int:
    """The control message's length after a payload of `payload_len` int64: room for 1.25x
    it (the next step's metadata is about the same: a decode row gains a block every
    block_size steps), rounded up to a power of two, within the bounds."""
    want = HEADER_LEN + payload_len + payload_len // 4
    return min(MAX_CAPACITY, max(MIN_CAPACITY, 1 << (want - 1).bit_length()))


class Command(enum.IntEnum):
    FORWARD = 1
    LOGITS_LAST = 2
    LOGITS_ROWS = 3
    STOP = 4
    LOAD_LIBRARY = 5
    UNLOAD_LIBRARY = 6
    SHARED_STEP = 7  # shared-KV ranks: the builds of a forward's groups (shared_kv_engine.py)
    PLACE_LIBRARY = 8  # shared-KV ranks: a build's new chunk placement (hot-chunk replicas)
    GRAPH_CAPTURE = 9  # capture the decode CUDA graph of a bucket (NCCL; tp_graphs.py)
    GRAPH_STEP = 10  # replay a bucket's decode graph


class Received(NamedTuple):
    """One command as a rank other than 0 receives it."""

    command: Command
    input_ids: torch.Tensor | None = None  # [T] int64 (FORWARD)
    positions: torch.Tensor | None = None  # [T] int64 (FORWARD; GRAPH_STEP: [n], host)
    # FORWARD; GRAPH_STEP: slot_mapping, seq_lens [n], block_tables [n, W] int64, host
    meta: AttentionMetadata | None = None
    hidden: torch.Tensor | None = None  # [N, H] (LOGITS_ROWS)
    # FORWARD: [(group JSON, rows [n] int64)] of its library groups; LOAD/UNLOAD: the JSON
    groups: list[tuple[dict, torch.Tensor]] | None = None
    info: dict | None = None
    logits_follow: int = 0  # FORWARD, GRAPH_STEP: FOLLOW_LOGITS / FOLLOW_TOKENS after it
    bucket: int = 0  # GRAPH_CAPTURE, GRAPH_STEP: the graph's batch-size bucket
