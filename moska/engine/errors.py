"""Typed errors for bad requests; each message says what to change."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine cannot accept as given."""


class PromptTooLongError(RequestError):
    pass


class DuplicateRequestError(RequestError):
    pass


class StepFailedError(RuntimeError):
    """A step raised (the runner, a kernel, the sampler). The engine rolled it back:
    `request_ids` (the request that failed while it ran alone, if any) were ended as
    aborted with their blocks freed; the step's other requests are recomputed; requests
    outside it are untouched."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(
            f"engine step failed ({type(cause).__name__}: {cause}); "
            f"{len(request_ids)} request(s) ended"
        )
        self.request_ids = request_ids
        self.cause = cause
