"""The ranks that engines here start (`DistributedRuntime.start`) fork from gloo_ranks'
forkserver, which has imported torch and the engine once, instead of being spawned (a fresh
interpreter: ~2.6 s of CPU importing torch per rank, more on loaded cores). Nothing else
differs: the ranks run the same entry points and watch rank 0 through the same pipe. They
run the kernels' PyTorch references (the forkserver's TRITON_INTERPRET=0)."""

import pytest
from gloo_ranks import forkserver_context

from moska.distributed.rank_processes import use_process_context


@pytest.fixture(scope="module", autouse=True)
def _ranks_fork_from_the_forkserver():
    """Per module, set up before the module's engine fixtures and reset after their
    shutdown: tests elsewhere keep the default (spawn)."""
    with use_process_context(forkserver_context):
        yield
