"""The messages between the event loop and the engine thread (`server/async_engine.py`):
the commands the loop puts on the thread's queue, and what the thread posts back to the loop
(`loop.call_soon_threadsafe`) to complete a future or fill the requests' streams."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from moska.engine.sampling_params import SamplingParams
from moska.server.request_stream import RequestStream


@dataclass
class Add:
    """Hand these requests (the n choices of one HTTP request) to the engine."""

    streams: list[RequestStream]
    prompt: str | list[int]
    params: list[SamplingParams]
    library: str | Sequence[str] | None  # a name, or several: a composition
    top_k_chunks: int | None
    report_routing: bool
    future: asyncio.Future


@dataclass
class Abort:
    """Abort these requests (unknown or finished ids are ignored)."""

    request_ids: list[str]


@dataclass
class Call:
    """Run `fn()` on the engine thread between steps; its result completes `future`."""

    fn: Callable[[], Any]
    future: asyncio.Future


class Stop:
    """Abort what is left and end the engine thread."""


def deliver(items: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


def set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
