"""The server drives one typed engine seam (moska/engine/protocol.py): the real engine and
the tests' fake engine both implement it."""

from __future__ import annotations

import inspect

import httpx
from conftest import running_server
from fake_engine import FakeEngine, FakeLibraryManager
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel

from moska import LLM
from moska.engine.llm_engine import LLMEngine
from moska.engine.protocol import ServedEngine, ServedLibraries, ServedTokenizer
from moska.library.manager import LibraryManager
from moska.model.tokenizer import Tokenizer
from moska.server.app import create_app


def test_the_fake_and_the_real_engine_implement_the_served_engine():
    assert isinstance(FakeEngine(), ServedEngine)
    real = LLM(None, device="cpu", dtype="float32", attention="torch", num_kv_blocks=32,
               max_model_len=512).engine  # fmt: skip
    assert isinstance(real, ServedEngine)
    # add_request takes every keyword the server passes
    for impl in (FakeEngine.add_request, LLMEngine.add_request):
        params = inspect.signature(impl).parameters
        assert {"library", "top_k_chunks", "report_routing"} <= set(params)


def test_the_tokenizers_and_library_managers_implement_the_server_seams(tmp_path):
    """The engine's tokenizer and library manager, real and fake, offer every method the
    server calls (ServedTokenizer, ServedLibraries), with the keywords it passes."""
    fake = FakeEngine(libraries=FakeLibraryManager())
    for tok in (fake.tokenizer, Tokenizer(HFTokenizer(WordLevel({"a": 0}, unk_token="a")))):
        assert isinstance(tok, ServedTokenizer)
        template = inspect.signature(tok.apply_chat_template).parameters
        assert any(p.kind is p.VAR_KEYWORD for p in template.values())  # tools=...
    for manager in (fake.libraries, LibraryManager(tmp_path, progress=False)):
        assert isinstance(manager, ServedLibraries)
        assert "on_progress" in inspect.signature(manager.build).parameters
        assert "wait_s" in inspect.signature(manager.delete).parameters
    assert not isinstance(object(), ServedLibraries)
    assert not isinstance(FakeLibraryManager(), ServedTokenizer)


def test_an_engine_without_step_is_not_a_served_engine():
    class Half:
        tokenizer = None
        model_name = "x"
        max_model_len = 8
        libraries = None

        def add_request(self, *a, **k): ...

    assert not isinstance(Half(), ServedEngine)


def test_a_model_without_a_tokenizer_answers_400_naming_the_field():
    """`ServedEngine.tokenizer` may be None (token-id prompts only): what needs the tokenizer
    (a text prompt, chat, echo of ids) is a 400 naming the field, never a 500."""
    engine = FakeEngine()
    engine.tokenizer = None
    with running_server(create_app(engine)) as url:
        base = {"model": "fake-model", "max_tokens": 2}
        cases = [
            ("completions", {"prompt": "hi"}, "prompt"),
            ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
            ("completions", {"prompt": [104, 105], "echo": True}, "echo"),
        ]
        for path, extra, field in cases:
            r = httpx.post(f"{url}/v1/{path}", json={**base, **extra})
            assert r.status_code == 400, (field, r.text)
            assert r.json()["error"]["param"] == field
            assert "tokenizer" in r.json()["error"]["message"]
