"""One engine on the built-in tiny model for the FlexiCache engine tests (its build dominates
their time); each test gets it with the hook it was built with."""

from __future__ import annotations

import pytest

from moska import LLM


@pytest.fixture(scope="session")
def _flexi_llm_built():
    llm = LLM(
        None, device="cpu", dtype="float32", attention="torch", num_kv_blocks=64,
        block_size=4, flexicache="k=2,recent=1,sink=1,threshold=2,r=2",
    )  # fmt: skip
    return llm, llm.engine.runner.flexi


@pytest.fixture
def flexi_llm(_flexi_llm_built):
    """The shared engine, its FlexiCache hook (every head unstable) attached again."""
    llm, built = _flexi_llm_built
    llm.engine.runner.flexi = built
    llm.engine.block_manager.free_listeners[:] = [built.release]
    return llm
