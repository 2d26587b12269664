"""On CUDA the shared-library attention runs on a high-priority side stream beside the
unique attention: the tokens must be those of the serial order, routed and not."""

import random

import pytest
import torch

from moska import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DOCS = [
    ("a.md", "MoSKA shares the KV of a long context across many requests. " * 6),
    ("b.md", "Each decode step routes every request to its top-k chunks and batches them. " * 4),
]


@pytest.mark.parametrize("top_k", [2, 10**6])
def test_overlap_matches_serial(tmp_path, top_k):
    llm = LLM(
        None,
        device="cuda",
        dtype="float32",
        num_kv_blocks=512,
        max_model_len=4096,
        library_root=str(tmp_path),
    )
    llm.engine.libraries.build("docs", DOCS, chunk_size=32, mode="prefix")
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 256) for _ in range(rng.randrange(3, 20))] for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    attention = llm.engine.runner.attention
    assert attention.overlap and attention.side_stream(torch.device("cuda")) is not None
    outs = {}
    # overlapped, overlapped with the key-max grid capped at one program per SM, serial
    for name, overlap, cap in (
        ("overlap", True, None),
        ("capped", True, 1),
        ("serial", False, None),
    ):
        attention.overlap, attention.keymax_programs_per_sm = overlap, cap
        outs[name] = llm.generate(prompts, params, library="docs", top_k_chunks=top_k)
    for name in ("overlap", "capped"):
        for a, b in zip(outs[name], outs["serial"]):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                for tok, lp in la.top.items():
                    assert abs(lp - lb.top[tok]) < 1e-4
