"""What the HTTP side holds of one engine request: its stream of outputs, fed by the
engine thread and consumed on the event loop, and the errors that end a stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from moska.engine.outputs import RequestOutput
from moska.server.admission import RequestCost


class EngineDeadError(RuntimeError):
    """The engine loop is not running (shut down, or not started)."""


class EngineStepError(RuntimeError):
    """engine.step() raised: the requests it names (or, if the engine could not contain it,
    every request in flight) fail with this."""


@dataclass
class RequestStream:
    """Outputs of one engine request, consumed on the event loop. Items are
    RequestOutput or an exception; the last RequestOutput has `finished=True`."""

    request_id: str
    num_prompt_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None  # set by the engine thread
    last_token_time: float | None = None
    finished: bool = False
    cost: RequestCost | None = None  # what admission counted for it
    predicted_ttft_s: float | None = None  # what admission predicted for it
    generated: int = 0  # tokens delivered so far (engine thread)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if item.finished:
                self.finished = True
            yield item
