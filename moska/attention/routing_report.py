"""What a library group's routing gave during one forward, reported as the attention runs.

The step's `AttentionMetadata` (and its `LibraryGroup`s) is the step's input and is never
written; the bound attention keeps one `GroupRouting` per group instead, which the runner
reads into the step's result (`engine/step_output.py`). A CUDA graph keeps the one of its
capture: each replay overwrites the tensors it holds.
"""

from __future__ import annotations

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
