"""One engine with semantic reuse and one without, shared by this folder's tests (the
built-in tiny model, CPU, fp32)."""

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
