"""A 429's drain: the predicted time until a request like the rejected one would be
admitted, which `Retry-After` and `retry-after-ms` say.

Why the requests inside the front door count: under a burst most requests are past the
door but not yet decided when the first 429s go out, and admission then admits those that
still fit the SLO. A drain from the engine's load as it was left them out: with half the
requests on a library (`moska bench load`, CPU, SLO 5 s), a library 429 promised 0.1-1 s
where a retry was admitted only after 5-9 s, when the engine had served the burst's
admitted requests and gone idle. So the drain is replayed over the engine's load plus the
requests inside that admission would still admit (`with_door`): those whose first token
can come within what fits the SLO, each like a typical admitted request.
"""

from __future__ import annotations

from typing import Protocol

from moska.server.queue_replay import Load, Prediction, RequestCost


class Predict(Protocol):
    """The controller's replay (`AdmissionController.predict`)."""

    def __call__(self, new: RequestCost, load: Load, num_requests: int = ...) -> Prediction: ...


def door_admits(
    predict: Predict, typical: RequestCost, load: Load, inside: int, fits: float
) -> int:
    """How many of the `inside` requests past the door admission would still admit: each
    is admitted only if its first token comes within `fits` of its arrival (about now: a
    request's time inside counts against the SLO), so the largest `n` for which the n-th
    of `n` copies of `typical` after `load` has its first token by `fits` (bisected: that
    time grows with `n`). Not one replay of all of them: it charged the hand-over of every
    request inside before the first step, and at 300 inside found none admitted where
    admission took 27. Doubling first, so 1,000 inside cost replays of tens of requests
    (a few ms), not of hundreds."""
    lo, hi = 0, 1
    while hi < inside and predict(typical, load, hi).ttft_s <= fits:
        lo, hi = hi, 2 * hi
    hi = min(hi, max(0, inside))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predict(typical, load, mid).ttft_s <= fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def with_door(load: Load, typical: RequestCost, admitted: int) -> Load:
    """`load` plus `admitted` typical requests handed over after it."""
    if admitted <= 0:
        return load
    return Load(
        load.waiting + (typical,) * admitted,
        load.running,
        load.num_pending + admitted,
        load.busy_s,
    )


def drain_s(pred: Prediction, *, fits: float, risk: float, door_wait_s: float) -> float:
    """The drain of a request whose replay (over the load ahead of it, the door's admitted
    requests included) is `pred`. FIFO: arriving `d` later, the same work ahead ends at
    the same time, so its TTFT is `pred.ttft_s - d`; while others wait ahead it must fit
    with `risk` (a library request: admitted once `risk * (ttft - d)` fits), after they
    are served without it. A request that cannot fit even alone on an idle engine (a
    library prefill longer than the SLO) is admitted only when the engine is idle: its
    drain is the time until then. A retry also waits for the requests inside the door to
    be decided (`door_wait_s`)."""
    if pred.alone_s > fits:
        engine = pred.idle_s
    else:
        engine = pred.ttft_s - fits / risk
        if engine > pred.clear_s:  # the queue ahead is served first: no risk then
            engine = max(pred.clear_s, pred.ttft_s - fits)
        engine = min(engine, pred.idle_s)
    return max(engine, door_wait_s, 0.0)
