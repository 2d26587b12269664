"""SemShareKV's shared blocks on a GPU (`-m cuda`, compiled Triton; built-in tiny model,
fp32, the engine as served: blend graphs, decode graphs): the reference's unshared blocks
are copied by the fused `rope_scatter` straight out of the paged cache (a block-backed
reference's rows are cache slots), the first layer's writes skip the shared rows through
the kernel table's `kv_write`; a request that shares gives the tokens and logprobs of one
that copies, holds fewer blocks, and every block is accounted for afterwards."""

import dataclasses
import os
import random

import pytest
import torch

from moska import LLM, SamplingParams

_CUDA = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
    reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0)",
)
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)


@_CUDA
def test_cuda_shared_equals_copied():
    llm = LLM(
        None, device="cuda", dtype="float32", num_kv_blocks=96, max_model_len=512,
        max_num_batched_tokens=512, max_num_seqs=4, semantic_reuse=True,
    )  # fmt: skip
    reuse, bm = llm.engine.semshare, llm.engine.block_manager
    rng = random.Random(17)
    a = [rng.randrange(0, 256) for _ in range(300)]
    b = list(a)
    for i in (3, 150, 260):  # no exact prefix; most blocks equal at shift 0
        b[i] = (b[i] + 1) % 256
    assert llm.generate([a], PARAMS)[0].num_reused_tokens == 0  # stored
    outs = {}
    for on in (True, False):
        reuse.config = dataclasses.replace(reuse.config, share_blocks=on)
        before = reuse.stats.shared_blocks
        outs[on] = llm.generate([b], PARAMS)[0]
        shared = reuse.stats.shared_blocks - before
        assert (shared > 10) if on else shared == 0
        assert outs[on].num_reused_tokens > 200
    x, y = outs[True].outputs[0], outs[False].outputs[0]
    assert x.token_ids == y.token_ids
    for p, q in zip(x.logprobs, y.logprobs, strict=True):
        for t, v in q.top.items():
            assert abs(p.top[t] - v) <= 1e-4 * max(1.0, abs(v))
    bm.check_integrity()
