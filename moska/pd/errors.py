"""Typed errors of prefill/decode disaggregation; each message says what to do."""

from __future__ import annotations


class TransferFailedError(RuntimeError):
    """A KV transfer between a prefill and a decode instance did not complete (a peer died
    or stopped answering, or the message was out of step). The front end retries the
    request on another decode instance or fails it; nothing waits on it any longer."""
