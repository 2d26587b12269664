"""Where a library's positions must fit: the model's trained context.

A prefix-mode library is one context at positions 0..S-1 and a request follows it, so the
library plus a request must fit the model's ``max_position_embeddings``; past that RoPE
positions are ones the model never saw and its output is noise. A position-independent
library prefills every chunk alone at positions 0..chunk_size-1 (after its ``chunk_sink``
prefix), so only one chunk plus a request must fit, however many chunks there are.
The build checks this before any prefill (``check_fits_context``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moska.library.errors import LibraryError

# Positions kept free for a request after the library: an eighth of the context, at most
# 256 (a prompt plus an answer of some length; the engine checks each request's real length).
MAX_REQUEST_ROOM = 256


class LibraryTooLongError(LibraryError):
    """A library whose positions (plus room for a request) do not fit the model's context.
    ``field`` names the build input to change (``mode`` or ``chunk_size``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def request_room(max_positions: int) -> int:
    """Positions a library leaves free for a request."""
    return max(1, min(MAX_REQUEST_ROOM, max_positions // 8))


def model_max_positions(config: Any) -> int | None:
    """The model's trained context (``max_position_embeddings``), None when unknown."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def check_fits_context(
    mode: str,
    num_tokens: int,
    chunk_size: int,
    max_positions: int | None,
    prefix_len: int = 0,
) -> None:
    """Raise ``LibraryTooLongError`` (saying what to build instead) when the library's
    positions plus ``request_room`` exceed ``max_positions``; nothing when it is None.
    ``prefix_len``: tokens prefilled in front of each independent chunk (``chunk_sink``)."""
    if max_positions is None:
        return
    room = request_room(max_positions)
    if mode == "prefix":
        if num_tokens + room > max_positions:
            raise LibraryTooLongError(
                f"a prefix-mode library of {num_tokens} tokens does not fit the model's "
                f"context of {max_positions} positions (with {room} left for a request): "
                "build it with `--mode independent` (each chunk encoded alone, any number "
                f"of chunks; --chunk-size at most {max_positions - room - 1}), or keep a "
                f"prefix-mode library under {max_positions - room} tokens",
                field="mode",
            )
        return
    longest = chunk_size + prefix_len  # a request's own tokens start there
    if longest + room > max_positions:
        raise LibraryTooLongError(
            f"a position-independent chunk of {longest} positions does not fit the model's "
            f"context of {max_positions} positions (with {room} left for a request): use a "
            f"chunk_size of at most {max_positions - room - prefix_len}",
            field="chunk_size",
        )


def chunk_sink_ids(loaded_model: Any, mode: str, chunk_sink: bool) -> list[int]:
    """The tokens prefilled in front of each independent chunk: the BOS under ``chunk_sink``
    (the model was trained with one in front of every text: a chunk without one makes its
    first token the attention sink, in every chunk), else none."""
    if not chunk_sink:
        return []
    if mode != "independent":
        raise LibraryError("chunk_sink is for position-independent libraries: --mode independent")
    tokenizer = getattr(loaded_model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(getattr(loaded_model, "config", None), "bos_token_id", None)
    if bos is None:
        raise LibraryError("chunk_sink needs the model's BOS token: this model names none")
    return [int(bos)]


@dataclass(frozen=True)
class IndependentOptions:
    """How a position-independent library is built and read (measured on moska-code-20m:
    bench/results/independent_quality.json). ``chunk_sink``: prefill each chunk after the
    BOS and let the request bring the one sink; ``temperature`` and ``log_scale``: APE's
    tempering of the library part (logits times 1/T, LSE plus log S in the merge)."""

    chunk_sink: bool = True
    temperature: float = 1.0
    log_scale: float = 0.0

    def __post_init__(self) -> None:
        if not 0.05 <= self.temperature <= 20.0:
            raise LibraryError(
                f"attention temperature must be in [0.05, 20], got {self.temperature}"
            )
        if not -20.0 <= self.log_scale <= 20.0:
            raise LibraryError(f"attention log scale must be in [-20, 20], got {self.log_scale}")


def shared_logit_adjustment(library: Any) -> tuple[float, float]:
    """(factor on sm_scale, bias on the LSE) of a library's part of the attention: (1, 0),
    exact, except for a position-independent library built with APE tempering."""
    manifest = getattr(library, "manifest", None)
    temperature = float(getattr(manifest, "attention_temperature", 1.0) or 1.0)
    return 1.0 / temperature, float(getattr(manifest, "attention_log_scale", 0.0) or 0.0)


def request_wants_bos(library: Any) -> bool:
    """Whether a request reading ``library`` starts with the BOS: yes without a library (the
    tokenizer's own rule) and after a ``chunk_sink`` library (it stores no sink), no after a
    prefix library (which starts with it)."""
    if library is None:
        return True
    return bool(getattr(getattr(library, "manifest", library), "chunk_sink", False))


def drop_template_bos(ids: list[int], bos_token_id: int | None, library: Any) -> list[int]:
    """A chat prompt's ids (rendered by the chat template, which writes its own BOS) as a
    request reading ``library`` sends them: without that BOS after a library that starts
    with one, which would otherwise stand twice in the context (as a text prompt there is
    encoded without it)."""
    if request_wants_bos(library) or bos_token_id is None or ids[:1] != [bos_token_id]:
        return ids
    return ids[1:]


# The measured defaults of `moska library build --mode independent` (see the README and
# bench/results/independent_quality.json).
DEFAULT_INDEPENDENT = IndependentOptions()
EXACT = IndependentOptions(chunk_sink=False)  # a prefix library: nothing changed


def independent_options(mode: str, given: IndependentOptions | None) -> IndependentOptions:
    """The options a build of ``mode`` uses: ``given`` or the defaults in independent mode;
    none in prefix mode (its attention is exact), where giving any is an error."""
    if mode != "independent":
        if given is not None and given != EXACT:
            raise LibraryError(
                "chunk_sink and attention tempering are for position-independent libraries: "
                "build with --mode independent, or leave them out"
            )
        return EXACT
    return given if given is not None else DEFAULT_INDEPENDENT


def check_documents_fit(
    loaded_model: Any,
    documents: Any,
    mode: str,
    chunk_size: int | None,
    independent: IndependentOptions | None = None,
) -> None:
    """The build's context check from its documents, before a build is queued (the server
    answers 400 at once instead of failing a job): tokenizes them in prefix mode (the only
    mode whose fit depends on the text), and in independent mode when ``chunk_size`` is
    None (the default size depends on the token count). Raises what ``build_from_corpus``
    would."""
    from moska.library.chunking import check_mode, tokenize_documents

    check_mode(mode, 1 if chunk_size is None else chunk_size)
    opts = independent_options(mode, independent)
    max_positions = model_max_positions(getattr(loaded_model, "config", None))
    if max_positions is None:
        return
    if mode == "independent":
        if chunk_size is None:
            corpus = tokenize_documents(loaded_model.tokenizer, documents, mode, None)
            chunk_size = corpus.chunk_size
        sink = 1 if opts.chunk_sink else 0
        check_fits_context(mode, chunk_size, chunk_size, max_positions, sink)
        return
    corpus = tokenize_documents(loaded_model.tokenizer, documents, mode, chunk_size)
    check_fits_context(mode, corpus.num_tokens, corpus.chunk_size, max_positions)


def independent_from_args(args: Any) -> IndependentOptions | None:
    """The IndependentOptions the flags ask for; None when none is given (the defaults)."""
    flags = {
        "chunk_sink": getattr(args, "chunk_sink", None),
        "temperature": getattr(args, "attention_temperature", None),
        "log_scale": getattr(args, "attention_log_scale", None),
    }
    given: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return None
    if getattr(args, "mode", "independent") != "independent":
        raise LibraryError(
            "--chunk-sink and --attention-* are for --mode independent (prefix is exact)"
        )
    return dataclasses.replace(DEFAULT_INDEPENDENT, **given)
