"""Token times of a stream the front end relays from a decode instance, for the global
scheduler's time-per-output-token correction (`GlobalScheduler.observe_tpot`).

A relayed SSE event is not one token: the server sends an event only when a step's token
adds text, so a token that ends inside a multi-byte character (or text held back for a
stop string) rides in a later event with the next one. Counting events as tokens put each
token at the time of ~2 (the byte-level tiny model: 1.86 tokens per event on the CPU trace
bench), so the learnt factor came out ~2x and the admission's TPOT ~2x pessimistic (#19).
The stream's own usage chunk gives its tokens; the front end asks the decode instance for
it (`with_usage`), drops it again where the client did not ask (`strip_usage`) and learns
tokens per event per decode instance (`GlobalScheduler.observe_events`)."""

from __future__ import annotations

import re
import time

WINDOW = 4  # token events per report: a slower host shows within a few tokens, not at the end
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
_USAGE_EVENT = re.compile(rb'"choices":\s*\[\]')  # the usage chunk: no choices
_FINISHED = re.compile(rb'"finish_reason":\s*"')  # a token event that ends its stream


class TokenTimes:
    """A relayed stream's token events after its first, in windows of WINDOW events: their
    seconds, and what the step model (at the decode batch of each moment) predicted."""

    def __init__(self) -> None:
        self.count, self.observed_s, self.predicted_s = 0, 0.0, 0.0
        self._last: float | None = None
        self.events = 0  # token events of the whole stream, its first included
        self.completion_tokens: int | None = None  # from the usage chunk, when it came

    def add(self, chunk: bytes, step_s: float) -> tuple[float, float] | None:
        """Count a relayed chunk; every WINDOW token events, (observed s, predicted s) of
        the window that ended. `step_s`: predicted seconds per token *event* (the step
        times the tokens one event carries)."""
        if (m := _COMPLETION_TOKENS.search(chunk)) is not None:
            self.completion_tokens = int(m.group(1))
        n = chunk.count(b'"finish_reason"')  # one per token event (not usage, not [DONE])
        if n == 0:
            return None
        self.events += n
        now = time.monotonic()
        last, self._last = self._last, now
        if last is None:
            return None
        self.count += n
        self.observed_s += now - last
        self.predicted_s += n * step_s
        if self.count < WINDOW:
            return None
        window = (self.observed_s, self.predicted_s)
        self.count, self.observed_s, self.predicted_s = 0, 0.0, 0.0
        return window

    def tokens_after_first(self) -> tuple[int, int] | None:
        """(tokens, events) after the first event, as the usage chunk counts tokens (the
        first event's tokens taken as one, as a client's TPOT takes them); None without
        a usage chunk or with a single event."""
        if self.completion_tokens is None or self.events < 2:
            return None
        return max(self.completion_tokens - 1, self.events - 1), self.events - 1


def finishes(chunk: bytes) -> bool:
    """Whether `chunk` holds its stream's last token event. When it is the stream's first
    too, the tokens before it came unseen (a model without a tokenizer has no text to
    stream: its whole output comes in the final event) and its time is not the first
    token's: the front end learnt such a decode (~0.13 s on 2 H200s) as the first token's
    fixed cost and its TTFT admitted 15% of a trace (#19, session 15). The front end then
    learns the first token only if the usage chunk counts one token."""
    return _FINISHED.search(chunk) is not None


def with_usage(body: dict) -> tuple[dict, bool]:
    """The body to send the decode instance (a stream that ends with its usage chunk) and
    whether that chunk must be dropped before the client (it did not ask for it)."""
    if not body.get("stream"):
        return body, False
    opts = body.get("stream_options")
    opts = opts if isinstance(opts, dict) else {}
    if opts.get("include_usage"):
        return body, False
    return {**body, "stream_options": {**opts, "include_usage": True}}, True


def strip_usage(chunk: bytes) -> bytes:
    """`chunk` without its usage event (an SSE event with no choices and a usage object)."""
    if b'"usage"' not in chunk or _USAGE_EVENT.search(chunk) is None:
        return chunk
    events = chunk.split(b"\n\n")
    kept = [e for e in events if not (_USAGE_EVENT.search(e) and b'"usage"' in e)]
    return b"\n\n".join(kept)
