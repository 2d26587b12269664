"""Tokenization and chat templating off the event loop, bounded.

Encoding a 10 MB message takes tens of seconds on one core; on the event loop it froze
`/health` and every stream for that long. `TokenizerPool.run` runs such work on a few
threads of its own (`Tokenizer.encode` lets go of the GIL while the Rust tokenizer works;
Jinja rendering is Python, and Python switches threads every few milliseconds), with two
bounds so that a flood of huge messages cannot exhaust memory or the pool:

- one prompt of more characters than `max_prompt_chars` is a 400 naming the field, before
  any work: by default the most characters that `max_model_len` tokens can spell (the
  longest token's text times the context length, doubled for normalizers), so every
  prompt that can fit the context passes;
- more than `max_pending_chars` characters waiting or in work is a 429 (retry shortly).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from moska.server.errors import APIError

T = TypeVar("T")

DEFAULT_TOKENIZER_WORKERS = 2
DEFAULT_MAX_PENDING_CHARS = 64 * 1024 * 1024
_NORMALIZER_SLACK = 2  # a normalizer may shrink text (NFC composes); be generous


def max_token_chars(tokenizer: Any) -> int:
    """Characters of the longest token's text (special tokens included), at least 1."""
    longest = 1
    for i in range(int(getattr(tokenizer, "vocab_size", 0) or 0)):
        try:
            longest = max(longest, len(tokenizer.decode([i], skip_special_tokens=False)))
        except Exception:  # noqa: BLE001, S112 - an id it cannot decode alone
            continue
    return longest


class TokenizerPool:
    """A few threads for tokenizer work, with a per-prompt and a total character bound.
    `max_prompt_chars` None: derived from the tokenizer and `max_model_len` on first use."""

    def __init__(
        self,
        tokenizer: Any,
        max_model_len: int,
        *,
        workers: int = DEFAULT_TOKENIZER_WORKERS,
        max_prompt_chars: int | None = None,
        max_pending_chars: int = DEFAULT_MAX_PENDING_CHARS,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_pending_chars = max_pending_chars
        self._max_prompt_chars = max_prompt_chars
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="moska-tokenize")
        self._lock = threading.Lock()
        self._pending = 0

    async def max_prompt_chars(self) -> int:
        if self._max_prompt_chars is None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._derive)
        assert self._max_prompt_chars is not None
        return self._max_prompt_chars

    async def run(self, fn: Callable[[], T], num_chars: int, param: str) -> T:
        """`fn()` on a pool thread. `num_chars`: the size of the user text it works on;
        `param`: the request field that text came from (named in a 400)."""
        limit = await self.max_prompt_chars()
        if num_chars > limit:
            raise APIError(
                400,
                f"{param!r} has {num_chars} characters, more than the {limit} that can fit "
                f"this model's context of {self.max_model_len} tokens; shorten it",
                param=param,
                code="context_length_exceeded",
            )
        with self._lock:
            if self._pending and self._pending + num_chars > self.max_pending_chars:
                raise APIError(
                    429,
                    f"the tokenizer has {self._pending} characters of other requests to "
                    "encode; retry in a moment",
                    code="tokenizer_busy",
                    headers={"Retry-After": "1"},
                )
            self._pending += num_chars
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        finally:
            with self._lock:
                self._pending -= num_chars

    def warm(self) -> None:
        """Start deriving `max_prompt_chars` now (server startup) rather than on the first
        request."""
        if self._max_prompt_chars is None:
            self._executor.submit(self._derive)

    def _derive(self) -> None:
        if self._max_prompt_chars is None:
            longest = max_token_chars(self.tokenizer)
            self._max_prompt_chars = self.max_model_len * longest * _NORMALIZER_SLACK

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
