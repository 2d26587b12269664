"""The server drives one typed engine seam (moska/engine/protocol.py): the real engine and
the tests' fake engine both implement it."""

from __future__ import annotations

import inspect

from fake_engine import FakeEngine

from moska import LLM
from moska.engine.llm_engine import LLMEngine
from moska.engine.protocol import ServedEngine


def test_the_fake_and_the_real_engine_implement_the_served_engine():
    assert isinstance(FakeEngine(), ServedEngine)
    real = LLM(None, device="cpu", dtype="float32", attention="torch", num_kv_blocks=32,
               max_model_len=512).engine  # fmt: skip
    assert isinstance(real, ServedEngine)
    # add_request takes every keyword the server passes
    for impl in (FakeEngine.add_request, LLMEngine.add_request):
        params = inspect.signature(impl).parameters
        assert {"library", "top_k_chunks", "report_routing"} <= set(params)


def test_an_engine_without_step_is_not_a_served_engine():
    class Half:
        tokenizer = None
        model_name = "x"
        max_model_len = 8
        libraries = None

        def add_request(self, *a, **k): ...

    assert not isinstance(Half(), ServedEngine)
