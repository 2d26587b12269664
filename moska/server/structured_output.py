"""A request's structured-output fields -> a compiled grammar -> one logits processor per
choice (moska/engine/structured.py does the grammar work).

`response_format` (OpenAI) and vLLM's `guided_json`, `guided_regex`, `guided_choice` are
read here; a request may use one of them. Compiling runs on the grammar compiler's own
threads, never on the event loop, within COMPILE_TIMEOUT_S; the compiler (vocabulary and LRU of compiled grammars) is
made once per server, on first use.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from moska.engine.sampling_params import SamplingParams
from moska.engine.structured import Grammar, GrammarCompiler, GrammarError, GrammarProcessor
from moska.server.errors import APIError

_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")
# A grammar that takes longer is refused (its compile goes on and is cached if it ends):
# e.g. `.{0,5000}` takes ~35 s on an 8k vocabulary, `[a-z]{1,1000}` ~1 s.
COMPILE_TIMEOUT_S = 30.0


def grammar_of(body: Any) -> Grammar | None:
    """The grammar a request asks for, or None; 400 naming the field when it is malformed."""
    given = [f for f in _FIELDS if _is_set(body, f)]
    if len(given) > 1:
        raise APIError(
            400,
            f"use only one of {', '.join(_FIELDS)} (got {', '.join(given)})",
            param=given[1],
            code="invalid_request",
        )
    try:
        if not given:
            return None
        field = given[0]
        if field == "guided_json":
            return Grammar.json_schema(body.guided_json, field)
        if field == "guided_regex":
            return Grammar.regex(body.guided_regex, field)
        if field == "guided_choice":
            return Grammar.choice(body.guided_choice, field)
        fmt = body.response_format
        if fmt.type == "json_object":
            return Grammar.json_object(field)
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise GrammarError(
                field, "response_format of type json_schema needs json_schema.schema"
            )
        return Grammar.json_schema(fmt.json_schema.schema_, field)
    except GrammarError as exc:
        raise APIError(400, str(exc), param=exc.param, code="invalid_grammar") from exc


def _is_set(body: Any, field: str) -> bool:
    value = getattr(body, field, None)
    if field == "response_format":
        return value is not None and value.type != "text"
    return value is not None


class ServerGrammars:
    """The server's grammar compiler and the threads it compiles on."""

    def __init__(self, engine: Any) -> None:
        tok = engine.tokenizer
        eos = set(getattr(tok, "eos_token_ids", ()) or ())
        eos |= set(getattr(getattr(engine, "model_config", None), "eos_token_ids", ()) or ())
        self.compiler = GrammarCompiler(tok, eos) if tok is not None and eos else None
        # two threads: one slow grammar does not hold up every other request's
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="moska-grammar")

    async def processors(self, grammar: Grammar, count: int) -> list[GrammarProcessor]:
        """`count` fresh processors for `grammar` (compiled off the event loop, or cached)."""
        if self.compiler is None:
            raise APIError(
                400,
                f"{grammar.param}: structured output needs the model's tokenizer and its "
                "end-of-sequence token",
                param=grammar.param,
            )
        loop = asyncio.get_running_loop()
        try:
            index = await asyncio.wait_for(
                loop.run_in_executor(self._pool, self.compiler.compile, grammar),
                COMPILE_TIMEOUT_S,
            )
        except GrammarError as exc:
            raise APIError(400, str(exc), param=exc.param, code="invalid_grammar") from exc
        except TimeoutError as exc:
            raise APIError(
                400,
                f"{grammar.param}: the grammar did not compile within {COMPILE_TIMEOUT_S:.0f} s;"
                " bound it more tightly (shorter repetitions, maxLength on strings)",
                param=grammar.param,
                code="grammar_too_complex",
            ) from exc
        eos, vocab = self.compiler.eos_token_ids, self.compiler.vocab_size
        return [GrammarProcessor(index, eos, vocab) for _ in range(count)]


def grammars(state: Any) -> ServerGrammars:
    if state.grammars is None:
        state.grammars = ServerGrammars(state.engine)
    return state.grammars


async def constrain(
    state: Any, grammar: Grammar | None, params: list[list[SamplingParams]]
) -> list[list[SamplingParams]]:
    """`params` with a grammar processor appended to every choice's logits processors."""
    if grammar is None:
        return params
    procs = iter(await grammars(state).processors(grammar, sum(len(row) for row in params)))
    return [
        [replace(p, logits_processors=(*p.logits_processors, next(procs))) for p in row]
        for row in params
    ]
