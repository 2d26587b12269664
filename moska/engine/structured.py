"""Structured output: a JSON schema, a regex or a list of choices as a logits processor.

Built on outlines-core (a Rust library with CPU wheels and no Python dependencies): a
grammar is compiled once into an index over the tokenizer's vocabulary (for every automaton
state, the tokens that may follow), so each step's mask is a table look-up. A
`GrammarProcessor` is the per-request state: it follows the request's output tokens through
that index and sets every token the grammar does not allow next to -inf; once the grammar
is complete only an end-of-sequence token is left, so generation stops there.

outlines-core compiles regular languages. JSON nested without bound is not one, so open
values (`json_object`, an object without `properties`, an array without `items`, `{}`) are
generated with at most two levels of nesting: outlines' own default of three levels makes an
automaton that takes 20-35 s to build on a 261- or 8192-token vocabulary, two levels under
a second.
"""

from __future__ import annotations

import copy
import enum
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import outlines_core

if TYPE_CHECKING:
    import torch

    from moska.model.tokenizer import Tokenizer

_SCALARS = [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
_ANY_SHALLOW = {"anyOf": _SCALARS}
# Any JSON value with at most two levels of objects / arrays (see the module docstring).
ANY_VALUE = {
    "anyOf": [
        *_SCALARS,
        {"type": "object", "additionalProperties": _ANY_SHALLOW},
        {"type": "array", "items": _ANY_SHALLOW},
    ]
}
JSON_OBJECT_SCHEMA = {"type": "object", "additionalProperties": ANY_VALUE}
WHITESPACE = r"[ ]?"  # at most one space between tokens: a weak model cannot pad forever
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


class GrammarError(ValueError):
    """A schema, regex or choice list that cannot be compiled; `param` names the request
    field it came from."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class GrammarKind(enum.Enum):
    JSON = "json"  # source: a JSON schema, canonical JSON text
    REGEX = "regex"  # source: the regex
    CHOICE = "choice"  # source: a JSON list of strings


@dataclass(frozen=True)
class Grammar:
    """What a request's output must match. Equal grammars share one compiled index."""

    kind: GrammarKind
    source: str
    param: str = field(default="response_format", compare=False)

    @classmethod
    def json_object(cls, param: str = "response_format") -> Grammar:
        return cls(GrammarKind.JSON, json.dumps(JSON_OBJECT_SCHEMA, sort_keys=True), param)

    @classmethod
    def json_schema(cls, schema: Any, param: str) -> Grammar:
        """A JSON schema given as an object or as JSON text."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(param, f"{param}: the schema is not valid JSON ({exc})") from exc
        if not isinstance(schema, dict):
            raise GrammarError(param, f"{param}: the schema must be a JSON object")
        return cls(GrammarKind.JSON, json.dumps(_bound_open_values(schema), sort_keys=True), param)

    @classmethod
    def regex(cls, pattern: str, param: str) -> Grammar:
        if not pattern:
            raise GrammarError(param, f"{param}: the regex is empty")
        return cls(GrammarKind.REGEX, pattern, param)

    @classmethod
    def choice(cls, choices: list[str], param: str) -> Grammar:
        if not choices or any(not isinstance(c, str) or not c for c in choices):
            raise GrammarError(param, f"{param}: give a non-empty list of non-empty strings")
        return cls(GrammarKind.CHOICE, json.dumps(list(choices)), param)

    def to_regex(self) -> str:
        if self.kind is GrammarKind.REGEX:
            return self.source
        if self.kind is GrammarKind.CHOICE:
            return "(" + "|".join(_escape(c) for c in json.loads(self.source)) + ")"
        try:
            return outlines_core.json_schema.build_regex_from_schema(self.source, WHITESPACE)
        except (ValueError, TypeError) as exc:
            raise GrammarError(self.param, f"{self.param}: unsupported JSON schema: {exc}") from exc


def _escape(text: str) -> str:
    """Escape for outlines' (Rust) regex syntax, which rejects escapes of non-meta chars."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def _bound_open_values(schema: dict) -> dict:
    """A copy of `schema` whose open values (object without properties, array without
    items, `{}`) are `ANY_VALUE` instead of outlines' three-level default."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if not (set(node) - {"title", "description"}):
            return {**node, **ANY_VALUE}
        types = node.get("type")
        types = set(types) if isinstance(types, list) else {types}
        open_props = node.get("additionalProperties", True) is True
        if "object" in types and "properties" not in node and open_props:
            node["additionalProperties"] = ANY_VALUE
        if "array" in types and "items" not in node and "prefixItems" not in node:
            node["items"] = ANY_VALUE
        for key in ("properties", "$defs", "definitions"):
            if isinstance(node.get(key), dict):
                node[key] = {k: visit(v) for k, v in node[key].items()}
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict):
                node[key] = visit(node[key])
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if isinstance(node.get(key), list):
                node[key] = [visit(v) for v in node[key]]
        return node

    return visit(schema)


# ---------------------------------------------------------------- vocabulary


def _byte_decoder() -> dict[str, int]:
    """Inverse of byte-level BPE's byte -> printable character map (GPT-2, Llama 3, Qwen)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def token_bytes(tokenizer: Tokenizer) -> dict[int, bytes]:
    """Each ordinary token id -> the bytes it stands for in the text; special tokens are left
    out (a grammar never allows them). Byte-level BPE and SentencePiece-style vocabularies
    (`▁` for a space, `<0xNN>` byte-fallback tokens) are understood."""
    hf = tokenizer._tok  # the wrapped `tokenizers.Tokenizer`
    spec = json.loads(hf.to_str())
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    byte_level = '"ByteLevel"' in json.dumps(spec.get("decoder"))
    decoder = _byte_decoder()
    out: dict[int, bytes] = {}
    for text, token_id in hf.get_vocab(with_added_tokens=True).items():
        if token_id in added:
            if not added[token_id].get("special"):
                out[token_id] = added[token_id]["content"].encode()
        elif byte_level:
            if all(c in decoder for c in text):
                out[token_id] = bytes(decoder[c] for c in text)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            out[token_id] = bytes([int(text[3:5], 16)])
        else:
            out[token_id] = text.replace("\u2581", " ").encode()
    return {i: b for i, b in out.items() if b}


# ---------------------------------------------------------------- compiling


class GrammarCompiler:
    """Compiles grammars for one tokenizer; keeps the last `cache_size` indexes (LRU).

    Thread-safe; the vocabulary is read on the first compile. Compiling takes from a
    millisecond to about a second: call `compile` off the event loop.
    """

    def __init__(
        self, tokenizer: Tokenizer, eos_token_ids: set[int] | list[int], cache_size: int = 64
    ) -> None:
        if not eos_token_ids:
            raise ValueError("structured output needs an end-of-sequence token id")
        self._tokenizer = tokenizer
        self.eos_token_ids = tuple(sorted(set(eos_token_ids)))
        self._cache_size = cache_size
        self._cache: OrderedDict[Grammar, outlines_core.Index] = OrderedDict()
        self._lock = threading.Lock()
        self._vocabulary: outlines_core.Vocabulary | None = None

    def _vocab(self) -> outlines_core.Vocabulary:
        if self._vocabulary is None:
            by_bytes: dict[bytes, list[int]] = {}
            for token_id, text in token_bytes(self._tokenizer).items():
                if token_id not in self.eos_token_ids:
                    by_bytes.setdefault(text, []).append(token_id)
            self._vocabulary = outlines_core.Vocabulary(self.eos_token_ids[0], by_bytes)
        return self._vocabulary

    def compile(self, grammar: Grammar) -> outlines_core.Index:
        with self._lock:
            if grammar in self._cache:
                self._cache.move_to_end(grammar)
                return self._cache[grammar]
            vocab = self._vocab()
        regex = grammar.to_regex()
        try:
            index = outlines_core.Index(regex, vocab)
        except Exception as exc:  # whatever outlines raises, the input was the user's
            what = "regex" if grammar.kind is GrammarKind.REGEX else "grammar"
            raise GrammarError(grammar.param, f"{grammar.param}: invalid {what}: {exc}") from exc
        with self._lock:
            self._cache[grammar] = index
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return index

    def processor(self, grammar: Grammar) -> GrammarProcessor:
        """A fresh per-request processor (compiles, or takes the cached index)."""
        return GrammarProcessor(self.compile(grammar), self.eos_token_ids, self.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size


class GrammarProcessor:
    """One request's grammar state, as a logits processor `(output_token_ids, logits[V]) ->
    logits[V]`. Stateful: feeds the tokens it has not seen yet to its guide, then masks."""

    def __init__(
        self, index: outlines_core.Index, eos_token_ids: tuple[int, ...], vocab_size: int
    ) -> None:
        self._index = index
        self._eos = eos_token_ids
        self._vocab_size = vocab_size  # the tokenizer's: the model's logits may be longer
        self._guide = outlines_core.Guide(index)
        self._seen = 0
        self._words: np.ndarray | None = None  # [ceil(V / 32)] int32, the guide's bitmask
        self.failed = False  # a token outside the grammar arrived: only EOS is allowed now

    def _advance(self, output_token_ids: list[int]) -> None:
        if len(output_token_ids) < self._seen:  # the output was cut back: follow it again
            self._guide, self._seen, self.failed = outlines_core.Guide(self._index), 0, False
        for token in output_token_ids[self._seen :]:
            if self.failed or token in self._eos:
                continue
            try:
                self._guide.advance(token, return_tokens=False)
            except (ValueError, RuntimeError):
                self.failed = True
        self._seen = len(output_token_ids)

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        import torch

        self._advance(output_token_ids)
        vocab = logits.shape[-1]
        if self._words is None:
            size = max(vocab, self._vocab_size)
            self._words = np.zeros((size + 31) // 32, dtype=np.int32)
        words = self._words
        if self.failed:
            words[:] = 0
        else:
            self._guide.write_mask_into(words.ctypes.data, words.size, 4)
        first = self._eos[0]
        if self.failed or (words[first // 32] >> (first % 32)) & 1:
            unsigned = words.view(np.uint32)
            for t in self._eos:  # any end-of-sequence token the engine stops on
                if t < 32 * words.size:
                    unsigned[t // 32] |= np.uint32(1 << (t % 32))
        # bit i of word w is token 32 w + i (little-endian words, so bytes in order)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab]  # [V] uint8
        allowed = torch.from_numpy(bits).to(logits.device).bool()  # [V]
        return logits.masked_fill(~allowed, float("-inf"))
