"""The grammar-backed logits processor, standalone: random logits sampled through it always
give text the grammar matches, ending in EOS."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch

from moska.engine.structured import Grammar, GrammarCompiler, GrammarError, token_bytes
from moska.model.default import default_model_dir
from moska.model.tokenizer import Tokenizer

CODE_MODEL = Path(__file__).resolve().parents[3] / "shared" / "models" / "moska-code-20m"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["a", "b"]},
    },
    "required": ["name", "age", "tags", "ok", "kind"],
}


def check_schema_instance(value) -> None:
    """SCHEMA by hand (no jsonschema dependency)."""
    assert isinstance(value, dict)
    assert set(value) == {"name", "age", "tags", "ok", "kind"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 6 for t in value["tags"])
    assert isinstance(value["ok"], bool)
    assert value["kind"] in ("a", "b")


@pytest.fixture(scope="module", params=["tiny", "code-20m"])
def tokenizer(request) -> Tokenizer:
    if request.param == "tiny":
        return Tokenizer.from_pretrained(default_model_dir())
    if not (CODE_MODEL / "tokenizer.json").is_file():
        pytest.skip("shared/models/moska-code-20m is not here")
    return Tokenizer.from_pretrained(CODE_MODEL)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, tokenizer.eos_token_ids)


@functools.cache
def _tiny_compiler() -> GrammarCompiler:
    tok = Tokenizer.from_pretrained(default_model_dir())
    return GrammarCompiler(tok, tok.eos_token_ids)


def sample(tokenizer, compiler, grammar, seed: int, max_tokens: int = 400) -> tuple[str, bool]:
    """Sample from random logits through the processor; (text, ended with EOS)."""
    proc = compiler.processor(grammar)
    gen = torch.Generator().manual_seed(seed)
    vocab = tokenizer.vocab_size
    out: list[int] = []
    for _ in range(max_tokens):
        logits = torch.randn(vocab, generator=gen) * 3
        masked = proc(list(out), logits)
        assert masked.shape == logits.shape
        probs = torch.softmax(masked, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=gen))
        assert masked[token] > float("-inf")
        if token in tokenizer.eos_token_ids:
            return tokenizer.decode(out), True
        out.append(token)
    return tokenizer.decode(out), False


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_outputs_validate(tokenizer, compiler, seed):
    text, ended = sample(tokenizer, compiler, Grammar.json_schema(SCHEMA, "guided_json"), seed)
    assert ended, text
    check_schema_instance(json.loads(text))


@pytest.mark.parametrize("seed", range(4))
def test_json_object_outputs_parse(seed):
    """On the byte vocabulary only: random logits over 8k tokens almost never close an open
    string ('"' is in few of them); the schema tests bound their strings for that one."""
    tokenizer = Tokenizer.from_pretrained(default_model_dir())
    compiler = _tiny_compiler()
    text, ended = sample(tokenizer, compiler, Grammar.json_object(), seed, max_tokens=3000)
    assert ended, text
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("seed", range(4))
def test_regex_and_choice(tokenizer, compiler, seed):
    pattern = r"[a-z]{1,8}@[a-z]{1,5}\.(com|org)"
    text, ended = sample(tokenizer, compiler, Grammar.regex(pattern, "guided_regex"), seed)
    assert ended and re.fullmatch(pattern, text), text
    choices = ["yes", "no (really)", "a+b"]
    text, ended = sample(tokenizer, compiler, Grammar.choice(choices, "guided_choice"), seed)
    assert ended and text in choices


def test_complete_grammar_forces_eos(tokenizer, compiler):
    """After the third digit of [0-9]{3} only end-of-sequence tokens stay."""
    proc = compiler.processor(Grammar.regex("[0-9]{3}", "guided_regex"))
    ids = tokenizer.encode("123", add_special_tokens=False)
    masked = proc(ids, torch.zeros(tokenizer.vocab_size))
    allowed = set(torch.nonzero(masked > float("-inf")).flatten().tolist())
    assert allowed == set(tokenizer.eos_token_ids)
    # partway, EOS is not allowed and every allowed token keeps the text a digit prefix
    proc = compiler.processor(Grammar.regex("[0-9]{3}", "guided_regex"))
    masked = proc(ids[:1] if len(ids) == 3 else [], torch.zeros(tokenizer.vocab_size))
    allowed = torch.nonzero(masked > float("-inf")).flatten().tolist()
    assert allowed and not set(allowed) & set(tokenizer.eos_token_ids)
    assert all(tokenizer.decode([t]).isdigit() for t in allowed)


def test_extra_eos_ids_allowed_at_the_end(tokenizer):
    extra = max(tokenizer.eos_token_ids) + 1  # e.g. a generation_config.json <|eot_id|>
    comp = GrammarCompiler(tokenizer, {*tokenizer.eos_token_ids, extra})
    proc = comp.processor(Grammar.choice(["x"], "guided_choice"))
    masked = proc(
        tokenizer.encode("x", add_special_tokens=False), torch.zeros(tokenizer.vocab_size)
    )
    assert set(torch.nonzero(masked > float("-inf")).flatten().tolist()) == {
        *tokenizer.eos_token_ids,
        extra,
    }


def test_history_cut_back_is_followed_again(tokenizer, compiler):
    proc = compiler.processor(Grammar.choice(["ab", "cd"], "guided_choice"))
    zeros = torch.zeros(tokenizer.vocab_size)
    a = tokenizer.encode("a", add_special_tokens=False)
    proc(a, zeros)
    masked = proc([], zeros)  # e.g. a recomputed request: the guide starts again
    allowed = {tokenizer.decode([t]) for t in torch.nonzero(masked > float("-inf")).flatten()}
    assert allowed & {"a", "c"} == {"a", "c"}


def test_token_outside_the_grammar_ends_with_eos(tokenizer, compiler):
    proc = compiler.processor(Grammar.regex("[0-9]+", "guided_regex"))
    masked = proc(
        tokenizer.encode("x", add_special_tokens=False), torch.zeros(tokenizer.vocab_size)
    )
    assert set(torch.nonzero(masked > float("-inf")).flatten().tolist()) == set(
        tokenizer.eos_token_ids
    )
    assert proc.failed


def test_compiled_index_is_cached_lru(tokenizer):
    comp = GrammarCompiler(tokenizer, tokenizer.eos_token_ids, cache_size=1)
    a, b = Grammar.regex("a+", "guided_regex"), Grammar.regex("b+", "guided_regex")
    first = comp.compile(a)
    assert comp.compile(Grammar.regex("a+", "response_format")) is first  # param not in key
    comp.compile(b)
    assert comp.compile(a) is not first  # evicted by b, compiled again


@pytest.mark.parametrize(
    ("make", "param"),
    [
        (lambda: Grammar.json_schema({"type": "nope"}, "response_format"), "response_format"),
        (lambda: Grammar.json_schema("{not json", "guided_json"), "guided_json"),
        (lambda: Grammar.json_schema([1], "guided_json"), "guided_json"),
        (lambda: Grammar.regex("[a-", "guided_regex"), "guided_regex"),
        (lambda: Grammar.regex("", "guided_regex"), "guided_regex"),
        (lambda: Grammar.choice([], "guided_choice"), "guided_choice"),
    ],
)
def test_bad_grammars_raise_naming_the_field(compiler, make, param):
    with pytest.raises(GrammarError) as err:
        compiler.compile(make())
    assert err.value.param == param and param in str(err.value)


def test_token_bytes_sentencepiece_style():
    """`▁` is a space and `<0xNN>` one byte (Llama 2 / Mistral vocabularies)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "▁hi": 4, "a": 5}
    hf = HF(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
    tb = token_bytes(Tokenizer(hf, {"eos_token": "</s>"}))
    assert tb == {3: b"\n", 4: b" hi", 5: b"a"}


@pytest.mark.parametrize("extra", [-5, 0, 64])
def test_logits_longer_or_shorter_than_the_vocabulary(tokenizer, compiler, extra):
    """A model's logits may be padded past the tokenizer's vocabulary (or cut short)."""
    vocab = tokenizer.vocab_size + extra
    proc = compiler.processor(Grammar.regex("[0-9]+", "guided_regex"))
    masked = proc([], torch.zeros(vocab))
    allowed = torch.nonzero(masked > float("-inf")).flatten().tolist()
    assert masked.shape == (vocab,) and allowed and max(allowed) < tokenizer.vocab_size
    assert all(tokenizer.decode([t]).isdigit() for t in allowed)
