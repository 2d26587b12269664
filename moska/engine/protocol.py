"""The engine the HTTP server drives: what `server/` may call, as one typed seam.

`LLMEngine` (engine/llm_engine.py) implements it, and so does the tests' fake engine
(tests/server/fake_engine.py); the server is typed against this protocol alone, so a
method the server starts to use must be added here, and both implementations then follow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Protocol, runtime_checkable

from moska.engine.outputs import RequestOutput
from moska.engine.sampling_params import SamplingParams


@runtime_checkable
class ServedTokenizer(Protocol):
    """The tokenizer surface the server uses (model/tokenizer.py Tokenizer implements it):
    prompts and chat messages in, text out, and the ids that end a sequence."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> AbstractSet[int]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],  # OpenAI message objects, as the client sent them
        add_generation_prompt: bool = True,
        **kwargs: Any,  # passed to the template: tools, enable_thinking, ...
    ) -> str: ...


class LibrarySummary(Protocol):
    """What the server shows of one library (library/info.py LibraryInfo implements it;
    server/library_routes.py `to_object` copies its fields)."""

    @property
    def name(self) -> str: ...

    @property
    def num_tokens(self) -> int | None: ...

    @property
    def num_chunks(self) -> int | None: ...

    @property
    def chunk_size(self) -> int | None: ...

    @property
    def mode(self) -> str | None: ...


@runtime_checkable
class ServedLibraries(Protocol):
    """The library calls the server makes (library/manager.py LibraryManager implements
    them): list, show, build (server/build_worker.py) and delete, and the tier counters
    the metrics export. Optional extras (`reserve`, `load_built`, `loaded_model`) are
    looked up with getattr where a manager may lack them."""

    def list(self) -> Sequence[LibrarySummary]: ...

    def info(self, name: str) -> LibrarySummary: ...

    def build(
        self,
        name: str,
        documents: Sequence[tuple[str, str | Sequence[int]]],
        chunk_size: int | None,
        mode: str,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> LibrarySummary: ...

    def delete(self, name: str, wait_s: float = 0.0) -> None: ...

    def tier_stats(self) -> dict[str, dict]: ...


class EngineLoad(Protocol):
    """The load figures admission reads each step (engine/llm_engine.py EngineStats)."""

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_running(self) -> int: ...

    @property
    def waiting_prefill_tokens(self) -> int: ...


@runtime_checkable
class ServedEngine(Protocol):
    """One engine, driven by one thread (server/async_engine.py): requests in, outputs out."""

    model_name: str  # the id clients send as `model`
    max_model_len: int

    @property
    def tokenizer(self) -> ServedTokenizer | None:
        """The model's tokenizer; None for a model without one (token-id prompts only)."""

    @property
    def libraries(self) -> ServedLibraries | None:
        """The library manager; None: this engine serves no libraries."""

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        library: str | Sequence[str] | None = None,
        top_k_chunks: int | None = None,
        report_routing: bool = False,
    ) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    def stats(self) -> EngineLoad: ...

    def step(self) -> list[RequestOutput]: ...
