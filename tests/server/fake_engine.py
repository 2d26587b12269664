"""A small deterministic engine with the LLMEngine interface, for tests that need what the
real one cannot give cheaply: slow steps (overload), a library manager, forced failures."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from moska.engine.errors import PromptTooLongError, RequestError
from moska.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from moska.engine.sampling_params import SamplingParams
from moska.library.errors import LibraryExistsError, LibraryNotFoundError

EOS = 257


class FakeTokenizer:
    """Bytes are tokens; 256 is BOS, 257 EOS."""

    vocab_size = 260
    eos_token_ids = frozenset({EOS})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """`kwargs` (tools, ...) are ignored: the fake's template shows roles and content."""
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass(frozen=True)
class FakeLibraryInfo:
    name: str
    num_tokens: int
    num_chunks: int
    chunk_size: int
    mode: str
    model: str
    created: str
    position_offset: int = 0


class FakeLibraryManager:
    def __init__(self, build_seconds: float = 0.0) -> None:
        self._libs: dict[str, FakeLibraryInfo] = {}
        self.build_seconds = build_seconds
        self.thread_ids: set[int] = set()  # threads that called in (any but the event loop)
        self.build_thread_ids: set[int] = set()  # threads that built (the build worker's)
        self.loop_calls = 0  # calls made on a thread running an event loop

    def _touch(self) -> None:
        self.thread_ids.add(threading.get_ident())
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.loop_calls += 1  # called on an event loop thread

    def list(self):
        self._touch()
        return list(self._libs.values())

    def tier_stats(self) -> dict[str, dict]:
        return {}  # no library of the fake is served from tiers

    def info(self, name: str) -> FakeLibraryInfo:
        self._touch()
        if name not in self._libs:
            raise LibraryNotFoundError(name, "/fake")
        return self._libs[name]

    get = info

    def build(self, name, documents, chunk_size, mode, *, on_progress=None, **_):
        """Takes `build_seconds`, in ten pieces; `on_progress(done, total)` after each
        (it may raise to stop the build, as the real builder's prefill hook)."""
        self.build_thread_ids.add(threading.get_ident())
        if name in self._libs:
            raise LibraryExistsError(name, "/fake")
        tokens = sum(len(text.encode()) for _, text in documents)
        for piece in range(10):
            if on_progress is not None:
                on_progress(tokens * piece // 10, tokens)
            time.sleep(self.build_seconds / 10)
        size = chunk_size or 64
        info = FakeLibraryInfo(
            name,
            tokens,
            -(-tokens // size),
            size,
            mode,
            "fake-model",
            datetime.now(UTC).isoformat(),
        )
        self._libs[name] = info
        return info

    def delete(self, name: str, wait_s: float = 0.0) -> None:
        self._touch()
        if self._libs.pop(name, None) is None:
            raise LibraryNotFoundError(name, "/fake")


@dataclass
class FakeStats:
    num_waiting: int
    num_running: int
    waiting_prefill_tokens: int


@dataclass
class _Req:
    rid: str
    prompt: list[int]
    params: SamplingParams
    rng: random.Random
    out: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    started: bool = False
    sent_text: int = 0


class FakeEngine:
    """Each step prefills every waiting request (one token out) and decodes every running
    one; tokens are lowercase letters chosen by the request's seed (or the prompt when
    greedy). `step_delay` seconds of sleep per step simulate a slow model."""

    def __init__(
        self,
        *,
        step_delay: float = 0.0,
        max_model_len: int = 512,
        libraries: FakeLibraryManager | None = None,
    ) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.libraries = libraries
        self.step_delay = step_delay
        self.fail_next_step = False
        self._reqs: dict[str, _Req] = {}
        self.aborted: list[str] = []
        self.step_threads: set[int] = set()

    def add_request(
        self, request_id, prompt, params, *, library=None, top_k_chunks=None, report_routing=False
    ):
        if request_id in self._reqs:
            raise RequestError(f"duplicate request id {request_id}")
        if library is not None:
            if self.libraries is None:
                raise RequestError("this engine has no library manager")
            self.libraries.get(library)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError("prompt plus max_tokens exceeds the context length")
        if params.greedy:
            seed = sum(ids)
        elif params.seed is not None:
            seed = params.seed
        else:
            seed = random.getrandbits(32)
        self._reqs[request_id] = _Req(request_id, ids, params, random.Random(seed))

    def abort_request(self, request_id):
        if self._reqs.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._reqs)

    def stats(self) -> FakeStats:
        waiting = [r for r in self._reqs.values() if not r.started]
        return FakeStats(
            len(waiting), len(self._reqs) - len(waiting), sum(len(r.prompt) for r in waiting)
        )

    def step(self) -> list[RequestOutput]:
        self.step_threads.add(threading.get_ident())
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        outputs = []
        for req in list(self._reqs.values()):
            req.started = True
            token = 97 + req.rng.randrange(26)
            req.out.append(token)
            if req.params.logprobs is not None:
                top = {97 + (token - 97 + k) % 26: -0.5 - k for k in range(req.params.logprobs)}
                req.logprobs.append(TokenLogprob(token, -0.5, top))
            text = self.tokenizer.decode(req.out)
            reason = None
            for s in req.params.stop:
                if s in text:
                    text, reason = text[: text.index(s)], "stop"
                    break
            if reason is None and len(req.out) >= req.params.max_tokens:
                reason = "length"
            new_text = text[req.sent_text :]
            req.sent_text = len(text)
            if reason is not None:
                del self._reqs[req.rid]
            outputs.append(
                RequestOutput(
                    request_id=req.rid,
                    prompt_token_ids=req.prompt,
                    outputs=[
                        CompletionOutput(
                            0,
                            text,
                            list(req.out),
                            reason,
                            list(req.logprobs) if req.params.logprobs is not None else None,
                        )
                    ],
                    finished=reason is not None,
                    new_text=new_text,
                    new_token_ids=[token],
                )
            )
        return outputs
