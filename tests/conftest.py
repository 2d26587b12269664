"""Session-wide test settings: nothing downloaded, moska's files in a temporary home."""

import os
import tempfile

# Triton picks its interpreter when it is imported, for its own library functions too, so
# set it before any test module imports moska: kernels then run on the CPU everywhere.
# On a GPU, `TRITON_INTERPRET=0 pytest tests/library/test_library_cuda.py` compiles them.
os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread (child processes inherit it): the test models are tiny, and beside
# the engine, server and client threads a second OpenMP thread only spins in barriers.
# Measured on 2 busy cores: 3 requests x 24 tokens of the tiny model 24 s -> 1.2 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A home of its own for each test process: pytest-xdist's workers inherit the controller's
# environment, and one home shared by both would share the default library root (engines
# built without --library-root, e.g. tests/server's session engine) between tests running
# at once. A home the user set is kept.
if os.environ.get("MOSKA_HOME") in (None, os.environ.get("MOSKA_TEST_HOME")):
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1: set before conftest loads
    home = tempfile.mkdtemp(prefix=f"moska-test-home-{worker + '-' if worker else ''}")
    os.environ["MOSKA_HOME"] = os.environ["MOSKA_TEST_HOME"] = home


import pytest


@pytest.fixture(scope="session", autouse=True)
def _small_cpu_kv_default():
    """An engine on the CPU given no --num-kv-blocks or budget takes 128 MiB of unique KV
    here instead of the product's 1 GiB (`engine/memory.py`): zeroing 1 GiB cost each such
    engine ~0.6 s of CPU and ~1.4 s on a loaded box, and 2,048 blocks of the tiny model
    (32k tokens) are more than any test asks for. Explicit sizes and budgets are unchanged;
    `moska serve` subprocesses keep the product default."""
    from moska.engine import memory

    saved = memory.CPU_KV_DEFAULT_BYTES
    memory.CPU_KV_DEFAULT_BYTES = 128 << 20
    yield
    memory.CPU_KV_DEFAULT_BYTES = saved


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched while the test runs (the interpreter runs every
    one of them: a kernel called past the kernel table is caught too)."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: list[str] = []
    run = InterpretedFunction.run

    def record(self, *args, **kwargs):
        seen.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", record)
    return seen


def pytest_collection_modifyitems(config, items):
    """Mark the CUDA-only tests (a skipif whose reason names CUDA) `cuda`, so one command runs
    them all on a GPU machine: `TRITON_INTERPRET=0 python -m pytest -q -m cuda`."""
    for item in items:
        if any("CUDA" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
