"""What one step's attention needs to know, built once per step by the model runner.

Length vocabulary (per scheduled request b):
- q_len: tokens computed this step (cu_q_lens[b+1] - cu_q_lens[b]).
- seq_len: unique-KV tokens after this step (context + q_len); these are the request's own
  tokens only — a shared library is never in the unique cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LibraryGroup:
    """The rows of one step that attend to one shared library."""

    library: Any  # moska.library.loaded.LoadedLibrary
    rows: torch.Tensor  # [n] int64, indices into the step's packed tokens
    top_k: int  # chunks per row; >= library.num_chunks means all chunks (exact)
    scorer: str = "keymax"
    policy: Any = None  # moska.routing.RoutingPolicy; None: the default policy with `scorer`
    all_rows: bool = False  # rows == every packed token in order: no gather/scatter needed
    # what the step asks its routing to report (attention/routing_report.py: GroupRouting,
    # kept by the bound attention; this input is never written)
    record: bool = False  # report each layer's selections (the runner reads the last)
    coverage_layers: frozenset[int] = frozenset()  # layers that measure routing coverage


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, block * block_size + offset of each new token
    cu_q_lens: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    decode_only: bool  # every q_len == 1
    groups: list[LibraryGroup] = field(default_factory=list)
    flexi: Any = None  # moska.flexicache.engine_hook.FlexiStep: per-head decode page lists

    def __post_init__(self) -> None:
        assert self.cu_q_lens.numel() == self.seq_lens.numel() + 1
        assert self.block_tables.shape[0] == self.seq_lens.numel()
        assert self.slot_mapping.dtype == torch.int64
