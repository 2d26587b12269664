"""What one step's attention needs to know, built once per step by the model runner.

Length vocabulary (per scheduled request b):
- q_len: tokens computed this step (cu_q_lens[b+1] - cu_q_lens[b]).
- seq_len: unique-KV tokens after this step (context + q_len); these are the request's own
  tokens only — a shared library is never in the unique cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from moska.library.composition import ComposedLibrary
    from moska.library.loaded import LoadedLibrary

    # what a group's rows read: one loaded library, or several composed into one chunk space
    SharedLibrary = LoadedLibrary | ComposedLibrary


@dataclass
class LibraryGroup:
    """The rows of one step that attend to one shared library."""

    library: SharedLibrary
    rows: torch.Tensor  # [n] int64, indices into the step's packed tokens
    top_k: int  # chunks per row; >= library.num_chunks means all chunks (exact)
    scorer: str = "keymax"
    policy: Any = None  # moska.routing.RoutingPolicy; None: the default policy with `scorer`
    all_rows: bool = False  # rows == every packed token in order: no gather/scatter needed
    # what the step asks its routing to report (attention/routing_report.py: GroupRouting,
    # kept by the bound attention; this input is never written)
    record: bool = False  # report each layer's selections (the runner reads the last)
    coverage_layers: frozenset[int] = frozenset()  # layers that measure routing coverage

    def single(self) -> LoadedLibrary:
        """The group's library where it is one library: attention/backend.py sends composed
        groups to attention/composed.py, never here."""
        from moska.library.composition import ComposedLibrary  # the library imports us

        lib = self.library
        assert not isinstance(lib, ComposedLibrary), "a composed group on the one-library path"
        return lib

    def composed(self) -> ComposedLibrary:
        """The group's libraries where they are composed (attention/composed.py)."""
        from moska.library.composition import ComposedLibrary

        lib = self.library
        assert isinstance(lib, ComposedLibrary), "a one-library group on the composed path"
        return lib


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
