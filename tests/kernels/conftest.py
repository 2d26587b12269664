"""Kernel tests run Triton's interpreter on the CPU: set before triton is imported.
Unless the caller chose: `TRITON_INTERPRET=0 pytest -m cuda` compiles the CUDA tests (set
to "1" here, it made them skip on a GPU and ran interpreter tests there instead)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
