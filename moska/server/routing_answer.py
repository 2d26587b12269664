"""`report_routing`: checked on the request (it needs a library), then answered on each
choice's final output as `moska_routing`: the chunks the last step read, each with the
document and token span it covers, and the share of attention mass they held. Used by
server/generate.py."""

from __future__ import annotations

from typing import Any

from moska.engine.outputs import RequestOutput
from moska.server.errors import APIError
from moska.server.protocol import ChatCompletionRequest, CompletionRequest


def check_report_routing(body: CompletionRequest | ChatCompletionRequest) -> None:
    if body.report_routing and body.library is None:
        raise APIError(
            400,
            "report_routing needs a library: the routing report says which library chunks "
            "each step read",
            param="report_routing",
            code="report_routing_requires_library",
        )


def routing_report(out: RequestOutput) -> dict:
    """{"chunks": [{"chunk", "document", "start", "end"}], "coverage": share of library
    attention mass in [0, 1] or None}, both of the request's last step. Each chunk's
    document (the one it starts in) and token span come from the manifest of the library
    build the request read (`out.library`); without one they are null."""
    coverage = out.routing_coverage
    if coverage is not None:
        coverage = min(1.0, max(0.0, float(coverage)))  # float error around a share
    return {
        "chunks": [_routed_chunk(out.library, int(c)) for c in out.routed_chunks or []],
        "coverage": coverage,
    }


def _routed_chunk(library: Any, chunk: int) -> dict:
    try:
        span = library.chunk_span(chunk)
    except (AttributeError, IndexError):  # no library handle, or not one of its chunks
        return {"chunk": chunk, "document": None, "start": None, "end": None}
    return {"chunk": chunk, "document": span.document, "start": span.start, "end": span.end}
