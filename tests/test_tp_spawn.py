"""The default start method for tensor-parallel ranks, as users get it: spawn (the
distributed tests fork their ranks from a preloaded forkserver to save the imports; this
file keeps one run of the real path). The built-in tiny model over 2 ranks, greedy tokens
equal one process's; `shutdown()` leaves no rank behind."""

import pytest

from moska.distributed.rank_processes import process_context
from moska.engine.llm import LLM
from moska.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(120)


def test_spawned_ranks_generate_like_one_process():
    assert process_context().get_start_method() == "spawn"  # what users get
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [40, 41]]
    kw = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 16}  # not 1 GiB of KV a rank
    with LLM(None, **kw) as one:
        want = [o.outputs[0].token_ids for o in one.generate(prompts, params)]
    llm = LLM(None, tensor_parallel_size=2, **kw)
    try:
        procs = list(llm.engine.dist.monitor.procs.values())
        assert procs and all(p.is_alive() for p in procs)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.shutdown()
    assert got == want
    for p in procs:
        p.join(timeout=10)
        assert not p.is_alive()
