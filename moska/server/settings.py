"""Server settings: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # library uploads ride in JSON bodies


@dataclass(frozen=True)
class ServerSettings:
    """How the HTTP server runs. The engine's own settings live with the engine.

    `ttft_slo` (seconds): a new request whose predicted time to first token exceeds it is
    rejected with 429 (None: no SLO check). `max_queue`: requests waiting for their first
    step beyond which new ones are rejected (None: unbounded). `served_model_name`: the
    name clients send as `model` (None: the engine's `model_name`).

    Library builds over HTTP (`POST /v1/libraries`) run beside the engine, not on its
    thread: `max_build_tokens` per build, `max_concurrent_builds` at once, at most
    `max_queued_builds` waiting (beyond: 429), prefilling `build_prefill_tokens` tokens per
    forward (None: the build worker's default for the device), each in a child process
    sharing the weights when `build_in_process` is True (None, the default: on a thread of
    the server, which measured faster on CPU and on the H200; see server/build_worker.py). Tokenization and chat
    templating run on `tokenizer_workers` threads; a prompt of more than `max_prompt_chars`
    characters is a 400 (None: the most that the context can hold, from the longest token),
    and more than `max_tokenize_pending_chars` characters waiting to be encoded is a 429.
    `retry_bookings`: a 429 books its request for the moment its `Retry-After` names, and
    a retry of it then is admitted ahead of requests that came after it (server/bookings.py).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    ttft_slo: float | None = None
    max_queue: int | None = 256
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    served_model_name: str | None = None
    max_n: int = 16
    shutdown_drain_s: float = 30.0
    log_level: str = "info"
    max_build_tokens: int = 1 << 20
    max_concurrent_builds: int = 1
    max_queued_builds: int = 16
    build_prefill_tokens: int | None = None
    build_in_process: bool | None = None
    tokenizer_workers: int = 2
    max_prompt_chars: int | None = None
    max_tokenize_pending_chars: int = 64 * 1024 * 1024
    # max_tokens when a request leaves it out: what is left of the context after the
    # library and the prompt, capped by this (None: no cap, as vLLM)
    max_tokens_default: int | None = None
    # how often Python hands the GIL between the engine thread and the event loop while
    # serving (None: leave the interpreter's 5 ms); see server/app.py
    gil_switch_interval_s: float | None = 0.0005
    retry_bookings: bool = True
    # at startup, once the model, libraries and graphs are loaded: move every object alive
    # then out of the collector's reach (`gc.freeze`, as vLLM does); see server/app.py
    gc_freeze: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty when set; pass None to disable auth")
        if self.ttft_slo is not None and self.ttft_slo <= 0:
            raise ValueError(f"ttft_slo must be positive seconds, got {self.ttft_slo}")
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_tokens_default is not None and self.max_tokens_default < 1:
            raise ValueError(f"max_tokens_default must be >= 1, got {self.max_tokens_default}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be at least 1, got {self.max_n}")
        if self.shutdown_drain_s < 0:
            raise ValueError("shutdown_drain_s must be >= 0")
        for name in (
            "max_build_tokens",
            "max_concurrent_builds",
            "max_queued_builds",
            "tokenizer_workers",
            "max_tokenize_pending_chars",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.build_prefill_tokens is not None and self.build_prefill_tokens < 1:
            raise ValueError(
                f"build_prefill_tokens must be at least 1, got {self.build_prefill_tokens}"
            )
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be at least 1, got {self.max_prompt_chars}")
