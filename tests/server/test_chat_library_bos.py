"""A chat request reading a library that starts with the BOS sends its prompt without the
BOS its chat template wrote (a text prompt there is encoded without one), so the context
holds one BOS, as `moska generate --chat` with a library does too."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from moska.cli_commands import chat_prompt_ids

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

MESSAGES = [{"role": "user", "content": "Hi"}]


def test_chat_after_a_prefix_library_has_one_bos(real_server, real_engine, client, model):
    url, _ = real_server
    bos = real_engine.tokenizer.bos_token_id
    info = real_engine.libraries.build("bos-once", [("d.txt", "Cats sit on mats. " * 2)])
    assert real_engine.libraries.get("bos-once").manifest.begins_with_bos
    try:
        ids = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        assert ids[0] == bos and ids.count(bos) == 1  # the template writes the BOS
        lib = {"library": "bos-once"}
        chat = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=1, temperature=0, logprobs=True,
            extra_body=lib,
        )  # fmt: skip
        assert chat.usage.prompt_tokens == len(ids) - 1
        assert chat.usage.prompt_tokens_details.model_extra["library_tokens"] == info.num_tokens
        text = client.completions.create(
            model=model, prompt=ids[1:], max_tokens=1, temperature=0, logprobs=0, extra_body=lib
        )
        got = chat.choices[0].logprobs.content[0].logprob
        assert got == pytest.approx(text.choices[0].logprobs.token_logprobs[0], abs=1e-5)
    finally:
        real_engine.libraries.delete("bos-once")


def test_generate_chat_drops_the_template_bos_after_a_prefix_library(real_engine):
    tok = real_engine.tokenizer
    plain = chat_prompt_ids(tok, "Hi")
    assert plain[0] == tok.bos_token_id
    assert chat_prompt_ids(tok, "Hi", SimpleNamespace(chunk_sink=False)) == plain[1:]
    assert chat_prompt_ids(tok, "Hi", SimpleNamespace(chunk_sink=True)) == plain
