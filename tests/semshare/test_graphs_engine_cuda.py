"""SemShareKV in an engine as served on a GPU (`-m cuda`, compiled Triton; built-in tiny
model, fp16): the blend's CUDA graphs (captured at start) and the decode graphs (a reused
prompt's last token is a one-token step, when the blend does not compute it) give the
tokens and reuse counts of the same engine with every graph off (`enforce_eager`, blend
graphs off)."""

import os
import random

import pytest
import torch

from moska import LLM, SamplingParams

_CUDA = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
    reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0)",
)
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _prompts() -> list[list[int]]:
    rng = random.Random(20)
    a = [rng.randrange(0, 256) for _ in range(300)]
    b = list(a)
    for i in (40, 150, 260):
        b[i] = (b[i] + 1) % 256
    b = b[:100] + [5, 6, 7] + b[100:]  # edits and an insertion: most tokens shift by 3
    return [a, b, a]  # the original (stored), a near duplicate, an exact repeat


def _run(graphs: bool):
    llm = LLM(
        None, device="cuda", dtype="float16", num_kv_blocks=96, max_model_len=512,
        max_num_batched_tokens=512, max_num_seqs=4, semantic_reuse=True,
        enforce_eager=not graphs,
    )  # fmt: skip
    reuse = llm.engine.semshare
    if not graphs:
        reuse.graphs = None
    outs = [llm.generate([p], PARAMS)[0] for p in _prompts()]
    return [(o.outputs[0].token_ids, o.num_reused_tokens) for o in outs], reuse


@_CUDA
def test_engine_graphs_equal_eager():
    eager, _ = _run(False)
    graphed, reuse = _run(True)
    assert reuse.graphs is not None and len(reuse.graphs) > 0
    # the near duplicate's blend replays; the exact repeat takes the original's blocks from
    # the prefix cache and blends only its last, partial block (no bucket: from the buffers)
    assert reuse.graphs.replays >= 1 and reuse.graphs.eager <= 1
    assert eager[0][1] == 0 and eager[1][1] > 0
    assert [r for _, r in graphed] == [r for _, r in eager]
    same = sum(g == e for (g, _), (e, _) in zip(graphed, eager, strict=True))
    assert same >= 2, (graphed, eager)  # fp16: a near tie may flip one continuation
