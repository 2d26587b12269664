"""Tokenizer wrapper: round trip, special tokens, chat templates, incremental detokenization."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from moska.model import IncrementalDetokenizer, MissingFileError, Tokenizer, load_model

SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Héllo, 日本語 ✓?"},
]


def build_tokenizer_dir(path, *, add_bos=True, chat_template=CHAT_TEMPLATE):
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["hello world, the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "add_bos_token": add_bos,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture
def tok_dir(tmp_path):
    return build_tokenizer_dir(tmp_path / "tok")


def test_round_trip_and_special_tokens(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    text = "hello world, Héllo 日本語 ✓"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 0
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tok.eos_token_ids == {3}
    assert tok.vocab_size == HFTokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    assert tok.vocab_size > 256 + len(SPECIAL)


def test_no_bos_when_disabled(tmp_path):
    tok = Tokenizer.from_pretrained(build_tokenizer_dir(tmp_path / "t", add_bos=False))
    assert tok.encode("hello")[0] != tok.bos_token_id


def test_eos_from_generation_config_and_extra(tok_dir):
    (tok_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    tok = Tokenizer.from_pretrained(tok_dir, extra_eos_token_ids=[7])
    assert tok.eos_token_ids == {1, 3, 5, 7}


def test_chat_template(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    text = tok.apply_chat_template(MESSAGES)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHéllo, 日本語 ✓?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not tok.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("t\n")
    with_tools = tok.apply_chat_template(MESSAGES, tools=[{"name": "ö"}])
    assert 'tools: [{"name": "ö"}]' in with_tools
    with pytest.raises(Exception, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_matches_transformers(tok_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    tok = Tokenizer.from_pretrained(tok_dir)
    want = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(MESSAGES) == want
    text = "hello world, 日本語 ✓"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert ref.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)


def test_chat_template_jinja_file_and_named_list(tmp_path):
    d = build_tokenizer_dir(
        tmp_path / "t",
        chat_template=[
            {"name": "default", "template": "D{{ messages | length }}"},
            {"name": "tool_use", "template": "T"},
        ],
    )
    assert Tokenizer.from_pretrained(d).apply_chat_template(MESSAGES) == "D2"
    (d / "chat_template.jinja").write_text("J{{ bos_token }}{{ eos_token }}")
    assert Tokenizer.from_pretrained(d).apply_chat_template(MESSAGES) == "J<s><|im_end|>"


def test_missing_chat_template(tmp_path):
    tok = Tokenizer.from_pretrained(build_tokenizer_dir(tmp_path / "t", chat_template=None))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(MissingFileError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_incremental_detokenizer_multibyte(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    text = "hello 日本語 ✓ world"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some tokens end inside a character and are held back
    assert "".join(deltas) == text == detok.text
    assert detok.finish() == ""


def test_incremental_detokenizer_with_prompt_and_flush(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    prompt = tok.encode("hello")
    gen = tok.encode(" world 日", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    out = "".join(detok.add(i) for i in gen[:-1])  # last byte of '日' still missing
    assert out == " world "
    assert detok.finish() == "\ufffd"
    assert detok.add(tok.encode("!", add_special_tokens=False)) == "!"


def test_load_model_attaches_tokenizer(llama_dir):
    build_tokenizer_dir(llama_dir)
    (llama_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9]}))
    loaded = load_model(llama_dir)
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.eos_token_ids == {2, 3, 9}
