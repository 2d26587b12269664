"""Typed errors for bad requests; each message says what to change."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine cannot accept as given."""


class PromptTooLongError(RequestError):
    pass


class DuplicateRequestError(RequestError):
    pass
