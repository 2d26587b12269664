"""The engine the HTTP server drives: what `server/` may call, as one typed seam.

`LLMEngine` (engine/llm_engine.py) implements it, and so does the tests' fake engine
(tests/server/fake_engine.py); the server is typed against this protocol alone, so a
method the server starts to use must be added here, and both implementations then follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from moska.engine.outputs import RequestOutput
from moska.engine.sampling_params import SamplingParams


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

    tokenizer: Any  # model/tokenizer.py Tokenizer, or None for a model without one
    model_name: str  # the id clients send as `model`
    max_model_len: int
    libraries: Any  # library/manager.py LibraryManager, or None: no libraries served

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
