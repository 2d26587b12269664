"""What a library group's routing gave during one forward, reported as the attention runs.

The step's `AttentionMetadata` (and its `LibraryGroup`s) is the step's input and is never
written; the bound attention keeps one `GroupRouting` per group instead, which the runner
reads into the step's result (`engine/step_output.py`). A CUDA graph keeps the one of its
capture: each replay overwrites the tensors it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moska.kernels.selections import Selections


@dataclass
class GroupRouting:
    """One library group's routing in one forward: the selections of the layers it records
    (`LibraryGroup.record`) and the coverage of its `coverage_layers`."""

    selections: dict[int, Selections] = field(default_factory=dict)  # layer -> Selections
    coverage: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n] float32

    def clear(self) -> None:
        self.selections.clear()
        self.coverage.clear()

    def snapshot(
        self, copy: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.clone
    ) -> GroupRouting:
        """A copy the next replay of its CUDA graph cannot overwrite: the last recorded
        layer's selections (all a step's routing report reads, engine/step_output.py) and
        the coverage, each through `copy` (the runner's: a queued copy to pinned host
        memory, so that reading the report waits for this step, not for the step queued
        after it). It lets a library step replayed from a graph run ahead of its tokens."""
        out = GroupRouting(coverage={layer: copy(c) for layer, c in self.coverage.items()})
        if self.selections:
            last = max(self.selections)
            s = self.selections[last]
            out.selections[last] = Selections(copy(s.req), copy(s.kv_head), copy(s.chunk))
        return out
