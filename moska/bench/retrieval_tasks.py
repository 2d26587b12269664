"""Synthetic long-context retrieval, in token ids (no tokenizer): the task that
moska.bench.train_retrieval trains a model on and moska.bench.fidelity asks it.

A context is documents of filler tokens separated by SEP, with facts spread through them in
three formats:
- ``fact``: ``FACT k1 k2 k3 v1 v2 END``, asked as ``ASK_FACT k1 k2 k3`` -> ``v1 v2``;
- ``code``: an identifier definition ``DEF k1 k2 k3 v1 v2 )``, asked as
  ``ASK_CODE k1 k2 k3`` -> ``v1 v2``;
- ``hop`` (multi-hop): ``LINK a1 a2 a3 k1 k2 k3 END`` plus a ``fact`` for k, asked as
  ``ASK_HOP a1 a2 a3`` -> ``k1 k2 k3 v1 v2`` (the linked key, then its value: the link and
  the fact sit in different places).
Keys are 3 tokens and values 2 tokens from their own ranges; every key is unique in its
context. A question follows the context after ``QUESTION``; its answer tokens are checked
token by token. Each answer token follows, somewhere in the context, the token before it:
the lookup is an induction (match, copy the next token) on a key's last tokens.
``RetrievalSpec(separators=True)`` is the first format (``k IS v``, ``k ( v``, ``a TO k``,
questions ending on the separator, a hop answered by the value only): there the value is
two tokens after the key, and small models did not learn it (CPU: the value's first token
stayed at chance while its second, a one-token copy, was learnt).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

BOS, SEP, QUESTION = 0, 1, 2
FACT, IS, END, DEF, OPEN, CLOSE, LINK, TO = 3, 4, 5, 6, 7, 8, 9, 10
ASK_FACT, ASK_CODE, ASK_HOP = 11, 12, 13
FIRST_FILLER = 16
FORMATS = ("fact", "code", "hop")
SPEC_FILE = "retrieval_spec.json"


@dataclass(frozen=True)
class RetrievalSpec:
    vocab_size: int = 1024
    filler_tokens: int = 400  # ids [16, 416)
    key_tokens: int = 304  # ids after the filler
    value_tokens: int = 304  # ids after the keys
    context_tokens: int = 4096
    facts: int = 48  # facts per context (hops count as two)
    doc_tokens: int = 256  # mean document length
    formats: tuple[str, ...] = FORMATS  # which of FORMATS the contexts hold
    separators: bool = False  # IS / ( / TO between a key and its value (see context_array)

    def __post_init__(self) -> None:
        assert FIRST_FILLER + self.filler_tokens + self.key_tokens + self.value_tokens <= (
            self.vocab_size
        ), "token ranges exceed the vocabulary"
        if not self.formats or set(self.formats) - set(FORMATS):
            raise ValueError(f"formats {self.formats}: choose among {FORMATS}")

    @property
    def key_range(self) -> tuple[int, int]:
        lo = FIRST_FILLER + self.filler_tokens
        return lo, lo + self.key_tokens

    @property
    def value_range(self) -> tuple[int, int]:
        lo = self.key_range[1]
        return lo, lo + self.value_tokens

    def with_context(self, tokens: int) -> RetrievalSpec:
        facts = max(1, round(self.facts * tokens / self.context_tokens))
        return replace(self, context_tokens=tokens, facts=facts)

    def save(self, folder: Path) -> None:
        (Path(folder) / SPEC_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> RetrievalSpec:
        path = Path(folder) / SPEC_FILE
        if not path.is_file():
            raise SystemExit(f"{path} missing: train the model with moska.bench.train_retrieval")
        data = json.loads(path.read_text())
        if "formats" in data:
            data["formats"] = tuple(data["formats"])
        return cls(**data)


@dataclass(frozen=True)
class Example:
    context: list[int]  # BOS + documents
    question: list[int]  # QUESTION + ask tokens
    answer: list[int]
    fmt: str
    depth: float  # where the answer's fact sits in the context (0 = start)


def _key(rng: random.Random, spec: RetrievalSpec, used: set) -> tuple[int, ...]:
    lo, hi = spec.key_range
    while True:
        k = tuple(rng.randrange(lo, hi) for _ in range(3))
        if k not in used:
            used.add(k)
            return k


def _value(rng: random.Random, spec: RetrievalSpec) -> list[int]:
    lo, hi = spec.value_range
    return [rng.randrange(lo, hi) for _ in range(2)]


def make_context(rng: random.Random, spec: RetrievalSpec, num_questions: int):
    """(context ids, [(question, answer, format, depth)] for ``num_questions`` facts; 0 or a
    number above the context's facts asks every fact once)."""
    ctx, qs = context_array(rng, spec, num_questions)
    return ctx.tolist(), qs


def context_array(rng: random.Random, spec: RetrievalSpec, num_questions: int):
    """make_context with the context as a numpy array (training batches skip the lists)."""
    used: set = set()
    pieces: list[tuple[str, list[int], tuple | None]] = []  # (format, tokens, ask info)
    n = 0
    while n < spec.facts:
        fmt = rng.choice(spec.formats)
        k, v = _key(rng, spec, used), _value(rng, spec)
        # with separators a key's last token is two tokens before its value in the context
        # and the question ends on the separator; without, the value follows the key
        is_, open_, to = ([IS], [OPEN], [TO]) if spec.separators else ([], [], [])
        if fmt == "fact":
            pieces.append((fmt, [FACT, *k, *is_, *v, END], (ASK_FACT, k, is_, v)))
        elif fmt == "code":
            pieces.append((fmt, [DEF, *k, *open_, *v, CLOSE], (ASK_CODE, k, open_, v)))
        else:
            a = _key(rng, spec, used)
            pieces.append(("hop-link", [LINK, *a, *to, *k, END], None))
            # without separators the answer names the linked key, then its value: each step
            # is then a one-hop lookup of the token before (the chain written out)
            ans = list(v) if spec.separators else [*k, *v]
            pieces.append((fmt, [FACT, *k, *is_, *v, END], (ASK_HOP, a, is_, ans)))
            n += 1
        n += 1
    rng.shuffle(pieces)
    fact_len = sum(len(t) for _, t, _ in pieces)
    if fact_len + 1 > spec.context_tokens:
        raise ValueError(
            f"{spec.facts} facts ({fact_len} tokens) do not fit a {spec.context_tokens}-token "
            "context: ask for fewer facts or a longer context"
        )
    budget = spec.context_tokens - 1 - fact_len
    # filler drawn in one go (numpy; a token-by-token Python loop made data, not the GPU, the
    # training step's cost): documents cut by SEP, facts spread between filler runs
    gen = np.random.default_rng(rng.getrandbits(63))
    filler = gen.integers(FIRST_FILLER, FIRST_FILLER + spec.filler_tokens, budget)
    filler[gen.random(budget) < 1.0 / spec.doc_tokens] = SEP
    cuts = np.sort(gen.integers(0, budget + 1, len(pieces))).tolist()
    parts = [np.array([BOS])]
    asks = []
    prev, pos = 0, 1
    for (fmt, toks, ask), cut in zip(pieces, cuts):
        parts += [filler[prev:cut], np.array(toks)]
        pos += cut - prev
        prev = cut
        if ask is not None:
            asks.append((fmt, ask, pos))
        pos += len(toks)
    parts.append(filler[prev:])
    ctx = np.concatenate(parts)
    rng.shuffle(asks)
    qs = []
    for fmt, (marker, key, sep, value), at in asks[: num_questions or len(asks)]:
        qs.append(([QUESTION, marker, *key, *sep], value, fmt, at / len(ctx)))
    return ctx, qs


def make_examples(spec: RetrievalSpec, n: int, seed: int = 0) -> list[Example]:
    """``n`` contexts with one question each (held-out seeds: training uses others)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ctx, qs = make_context(rng, spec, 1)
        q, a, fmt, depth = qs[0]
        out.append(Example(ctx, q, a, fmt, depth))
    return out
