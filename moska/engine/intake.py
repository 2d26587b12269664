"""A client's request becomes a `Request`: the library builds it holds are acquired, its
prompt is tokenized (or its token ids checked against the vocabulary) and checked against
the model's context, its logit_bias against the vocabulary, and the model's other
end-of-sequence ids join its stop tokens. `LLMEngine.add_request` checks what depends on
the engine's own state (duplicate ids, ranks) and queues the result.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from moska.engine.errors import PromptTooLongError, RequestError
from moska.engine.request import LibraryHandle, Request
from moska.engine.sampling_params import SamplingParams, SamplingParamsError
from moska.library.composition import ComposedLibrary
from moska.library.positions import request_wants_bos
from moska.model.config import ModelConfig


def acquire_handle(libraries: Any, names: list[str]) -> Any:
    """The handle a request holds: None, one library, or a ComposedLibrary of several
    (each acquired from `libraries`, a LibraryManager; all released again if one fails or
    they do not compose)."""
    if len(names) <= 1:
        return libraries.acquire(names[0]) if names else None
    held = []
    try:
        for name in names:
            held.append(libraries.acquire(name))
        return ComposedLibrary(tuple(held))
    except BaseException:
        for part in held:
            libraries.release(part)
        raise


def make_request(
    request_id: str,
    prompt: str | list[int],
    params: SamplingParams,
    handle: LibraryHandle | None,
    top_k_chunks: int | None,
    report_routing: bool,
    *,
    tokenizer: Any,
    model_config: ModelConfig,
    max_model_len: int,
    semshare: Any = None,
) -> Request:
    """The checked Request of a prompt (text, or token ids) reading `handle`'s library (or
    none). Raises RequestError, PromptTooLongError or SamplingParamsError (ValueErrors
    whose message says what to change). `semshare`: a SemanticReuse that plans the prompt's
    reuse of a similar stored prompt's KV (plain requests without prompt_logprobs)."""
    offset = 0 if handle is None else handle.position_offset
    vocab = model_config.vocab_size
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestError("this model has no tokenizer; send token ids")
        # BOS unless a library that starts with one precedes (library/positions.py)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=request_wants_bos(handle))
    else:
        prompt_ids = list(prompt)
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    bad = [t for t, _ in params.logit_bias if t >= vocab]
    if bad:
        raise SamplingParamsError(
            "logit_bias",
            f"logit_bias names token ids outside the vocabulary [0, {vocab}): {bad[:4]}",
        )
    total = offset + len(prompt_ids) + params.max_tokens
    if offset + len(prompt_ids) >= max_model_len or total > max_model_len:
        raise PromptTooLongError(
            f"prompt ({len(prompt_ids)} tokens"
            + (f" after a {offset}-token library" if offset else "")
            + f") plus max_tokens ({params.max_tokens}) exceeds the model's context "
            f"length {max_model_len}; shorten the prompt or lower max_tokens"
        )
    eos = None
    if tokenizer is not None and tokenizer.eos_token_ids:
        eos = min(tokenizer.eos_token_ids)
    elif model_config.eos_token_ids:
        eos = model_config.eos_token_ids[0]
    extra_eos = set(model_config.eos_token_ids) - ({eos} if eos is not None else set())
    if extra_eos and not params.ignore_eos:  # the model's other eos ids stop it too
        stop_ids = tuple(sorted(set(params.stop_token_ids) | extra_eos))
        params = replace(params, stop_token_ids=stop_ids)
    plan = None
    if semshare is not None and handle is None and params.prompt_logprobs is None:
        plan = semshare.plan(prompt_ids)
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        sampling_params=params,
        eos_token_id=eos,
        library=handle,
        top_k_chunks=top_k_chunks,
        report_routing=report_routing,
        semantic=plan,
    )
