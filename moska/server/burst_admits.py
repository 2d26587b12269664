"""How many of the requests inside the front door admission will admit ahead of a 429's
retry: admission's own decisions replayed one by one, in the time the event loop takes to
make them, while the engine's step in progress runs starved by that work.

Why: a 429's drain counts as admitted ahead the requests inside that admission will still
take (`retry_drain.with_door`), and that count was the largest `n` whose `n`-th first token
fits the SLO if all `n` were decided at once (`retry_drain.door_admits`). Admission does
not decide them at once: the event loop decides one every `FrontDoor.gap_s` (2-3 ms on
CPU), and the first one admitted to an idle engine starts the burst's first step alone
(46 prompt tokens, predicted 0.02-0.03 s). That step ran 0.15-0.33 s in every 1,000-client
burst of session 14 (`moska bench load`, CPU, half on a library): the loop deciding the
others held the GIL, leaving the engine 8-13% of it. Admission scales its replay by how
far the step in progress has run past its prediction (`AdmissionController.predict`), so
it shut within ~50 ms of that step and took 20 requests where the door had counted 46: a
library 429 at the door, which waits for an idle engine, was promised the drain of 46
requests (7.0 s) for a real 3.2 s (7% within 2x). Decided while such a step runs, a
library 429 in the queue counted none inside as admitted (the replay scaled by the
overrun), yet once the step ended the 20 plain requests still inside were admitted ahead
of it: promised 2.2 s for 4.1-4.8 s.

So the door's count replays the decisions: the `k`-th plain request inside is decided
`k` decision gaps after the storm of door 429s (`FrontDoor.storm_s`) and admitted if
admission's prediction then (the step in progress `busy` that long, those admitted before
it pending) fits what is left of the SLO after its time inside. The step in progress
(or the first admitted one's, on an idle engine) runs at `ENGINE_SHARE` of its predicted
speed while the loop still decides those inside, at full speed after; once it ends the
rest are counted as before (`door_admits`, all at once).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

from moska.server.queue_replay import Load, Prediction, RequestCost
from moska.server.retry_drain import door_admits, with_door

# The engine's share of the CPU while the event loop decides a backlog of requests (reads
# bodies, tokenizes, replays the queue): the burst's first step ran 0.022-0.033 s of
# predicted work in 0.15-0.33 s in session 14's 1,000-client bursts (CPU, 2 cores, a quiet
# box). On a loaded box (load 2-10) that step ran 0.3-18x its prediction from run to run,
# and the loop thread's own CPU share (measured between decisions) did not foretell it.
# Live, 0.1 did not pay: on a quiet box at 1,000 clients retry-after-ms was within 2x for
# 0.69 (0.1) vs 0.75 (1.0) over 7 runs in session 15, and on the device's 16 idle cores
# (session 16, `load_bursts_device_cpu_session16.json`, 18 bursts per arm of 64/300/1,000)
# for 0.62 vs 0.76 of all 429s (0.58 vs 0.79 at 1,000; 0.74 vs 0.65 at 300): the default
# is 1.0 again (the engine not starved), 0.1 stays an A/B (`moska bench load --engine-share`)
ENGINE_SHARE = 1.0


class Predict(Protocol):
    """`AdmissionController.predict` (its replay, scaled by an overdue step in progress)."""

    def __call__(
        self, new: RequestCost, load: Load, num_requests: int = ..., *, overdue: bool = ...
    ) -> Prediction: ...


def step_end(start: float, work_s: float, storm_end: float, share: float) -> float:
    """When a step of `work_s` predicted seconds, from `start`, ends if it runs at `share`
    of its speed until `storm_end` and at full speed after."""
    slow = max(0.0, storm_end - start)
    if work_s <= share * slow:
        return start + work_s / share
    return max(start, storm_end) + work_s - share * slow


class Backlog(NamedTuple):
    """The requests inside the door (`FrontDoor`): how many, the loop's time per decision,
    how long they will have waited when the first is decided (`FrontDoor.stall_s`) and of
    that the storm of door 429s still to answer first (`FrontDoor.storm_s`)."""

    inside: int
    gap_s: float
    stall_s: float
    storm_s: float = 0.0


def burst_admits(
    predict: Predict,
    typical: RequestCost,
    load: Load,
    plain: int,
    backlog: Backlog,
    fits: float,
    first_scale: float = 1.0,
    share: float = ENGINE_SHARE,
) -> int:
    """How many of the `plain` requests (like `typical`) among those inside (`backlog`)
    admission will admit, on `load`: decided one every `inside / plain` decision gaps
    after the storm, each admitted when its prediction plus its time inside (the stall,
    and its wait for its turn) is within `fits`. `first_scale`: what the step in progress
    (or the idle engine's first) is expected to run over its prediction at least
    (`Slowdown.cold`, learned from earlier bursts). See the module doc."""
    inside, gap_s, stall_s, storm_s = backlog
    if plain <= 0:
        return 0
    every = gap_s * max(inside, plain) / plain  # between two plain decisions
    storm_end = storm_s + max(inside, plain) * gap_s  # the loop decides until then
    idle = not load.waiting and not load.running and load.busy_s <= 0
    if idle:  # the first one admitted starts the first step alone
        if predict(typical, load).ttft_s + stall_s > fits:
            return 0
        work = first = predict(typical, load, overdue=False).first_s
        base, start, admitted, k = Load((typical,)), storm_s, 1, 1
    else:  # the step in progress: as predicted until its prediction, starved past it
        first = predict(typical, load, overdue=False).first_s
        busy = max(0.0, load.busy_s)
        work = first - busy if busy <= first else max(0.0, first - share * busy)
        base, start, admitted, k = load, -busy, 0, 0
    end = max(step_end(max(start, 0.0), work, storm_end, share), start + first * first_scale)
    waiting, pending = base.waiting, base.num_pending

    def admits(k: int) -> bool:
        """Whether the `k`-th plain decision admits, all before it admitted."""
        t, extra = storm_s + k * every, k - int(idle)  # admitted since the step started
        busy = max(t - start, 1e-9)  # (started: those admitted since are not in it)
        ahead = Load(waiting + (typical,) * extra, base.running, pending + extra, busy)
        return predict(typical, ahead).ttft_s + stall_s + k * every <= fits

    # decisions in the step: those admitted are a prefix (each one's wait only grows, and
    # past its prediction the step scales the replay more); none after, until it ends
    if every > 0:
        in_step = min(plain, max(k, math.ceil((end - storm_s) / every - 1e-12)))
    else:
        in_step = plain if end > storm_s else k
    lo, hi = k, in_step
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if admits(mid) else (lo, mid)
    admitted += lo - k
    k = in_step
    if k >= plain:
        return admitted
    after = with_door(Load(waiting, base.running, pending), typical, admitted - int(idle))
    left = fits - stall_s - max(0.0, end - storm_s)
    return admitted + door_admits(predict, typical, after, plain - k, left)
