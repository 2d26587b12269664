"""One engine with semantic reuse and one without, shared by this folder's tests (the
built-in tiny model, CPU, fp32), and the blend tests' tiny-model setup."""

import pytest

from moska import LLM

_KW = {
    "device": "cpu",
    "dtype": "float32",
    "attention": "torch",
    "num_kv_blocks": 64,
    "max_model_len": 512,
}


@pytest.fixture(scope="session")
def plain_llm():
    return LLM(None, **_KW)


@pytest.fixture(scope="session")
def reuse_llm():
    return LLM(None, semantic_reuse=True, **_KW)


@pytest.fixture(scope="session")
def blend_cpu():
    """(model, reuse, reference, prompt ids, plan positions) of `test_graphs._setup` on the
    CPU in fp32 (the blend tests' shared setup; nothing of it is modified by a test)."""
    import torch
    from test_graphs import _setup

    return _setup("cpu", torch.float32)
