"""The step in progress while the front door's storm is answered (session 18): when it ends,
for a 429's drain (`AdmissionController._drain`).

Why: on CPU the event loop answering a burst's connections holds the GIL, and the engine's
step in progress barely moves until the loop is through. In the 18 bursts of session 17's
device call 2 (`load_bursts_device_cpu_session17_call2_*`, 4 idle cores a server) the
burst's first step ended within 0.05 s of the last door 429 in 15 bursts (it ran 0.09-0.83 s
for 0.01-0.26 s predicted), and admission reopened for plain requests at that step's end
(the own-body retries bracket the reopening to 2-40 ms there). The drain had charged the
step's overrun as "as much again as it has overrun so far", which grows with each 429's
time, where the reopening is one moment: plain door 429s of one 1,000-client burst were
promised 0.09 s at 0.56 s and 0.53 s at 1.02 s for a reopening at 1.12-1.16 s.

With the storm's end known (`FrontDoor.storm_until`: the door backlog's connections still
to answer x the loop's time per answer, `door_backlog.DoorBacklog`), the step ends at the
storm's end plus its predicted work not yet done, and each 429's promise counts down to
that moment (`step_delay_s`): a 429 later in the storm gets a shorter promise.
`AdmissionController.door_anchor`: "door" (the default since session 18's device calls 5
and 6: within 2x 0.59 pooled over 5 servers vs 0.53 off, library door 429s 0.60 vs 0.40,
plain door 429s a wash; plain drains and library drains at the door anchored), "plain",
"all" or "off" (`applies`; the A/B: docs/admission.md).
"""

from __future__ import annotations

import time
from typing import Any

MODES = ("off", "plain", "door", "all")


def storm_end(until: float, waiting: int, storm_s: float, now: float, min_backlog: int) -> float:
    """The storm's end as the door now sees it: `storm_s` from `now` while at least
    `min_backlog` connections wait (a storm, `DoorBacklog.min_backlog`); else the end seen
    last (`until`), which lapses by itself. Why not every count: a few connections waiting
    are no storm (a client's own retries sent while a long library prefill runs could make
    one: a guess at why `all` scored 0.60 at 64 clients in session 18's call 2, `plain`
    0.97), and the step in progress then overran on its own, which the overrun term says."""
    return now + storm_s if waiting >= min_backlog else until


def storm_left_s(storm_until: float, now: float | None = None) -> float:
    """Seconds until the door's storm is answered (0 when none is under way)."""
    now = time.monotonic() if now is None else now
    return max(0.0, storm_until - now)


def charged_s(first_s: float, busy_s: float) -> float:
    """What the queue replay charges for its first step (`queue_replay.replay`'s `left`): the
    whole step between steps, else what is left of it, at least a quarter."""
    if busy_s <= 0:
        return first_s
    return max(first_s - busy_s, 0.25 * first_s)


def step_delay_s(first_s: float, busy_s: float, storm_left: float) -> float:
    """How much later than the replay says the replay's first step ends (`first_s` its
    predicted seconds, `busy_s` how long it has run, 0: not started). Without a storm
    (`storm_left` 0) the overrun so far again (the drain before session 18); during one, the
    storm's end plus the step's work not done, less what the replay charged."""
    if storm_left <= 0:
        return max(0.0, busy_s - first_s)
    end = storm_left + max(0.0, first_s - max(0.0, busy_s))
    return max(0.0, end - charged_s(first_s, busy_s))


def applies(mode: str, library_attend: int, at_door: bool = False) -> bool:
    """Whether `mode` anchors the drain of a request with that library attention, at the
    door (body unread) or decided after reading: "plain" plain drains only, "door" those and
    library drains at the door, "all" every drain. Why "door": on session 18's two device
    calls, anchored library drains at the door came within 2x for ~0.6 of their 429s (0.44
    unanchored), library drains after reading for less than unanchored (0.36-0.87 vs
    0.81-0.92 with "plain")."""
    if mode not in MODES:
        raise ValueError(f"door_anchor must be one of {MODES}, got {mode!r}")
    if mode == "door":
        return at_door or not library_attend
    return mode == "all" or (mode == "plain" and not library_attend)


def backlog_left_s(door: Any) -> float:
    """How long the event loop is still busy with the burst: answering the door's storm
    (`storm_until`) or deciding the requests inside the door (`FrontDoor.wait_s`)."""
    return max(storm_left_s(door.storm_until), door.wait_s)


def storm_bounded_s(unscaled_s: float, scaled_s: float, storm_left: float) -> float:
    """A new request's predicted TTFT when the step in progress has overrun: the steps run
    at the overrun's pace (`scaled_s`: the replay with every step scaled by it) only until
    the loop's backlog is through, `storm_left` seconds from now (`backlog_left_s`), and as
    the fit says after (`unscaled_s`): the share `storm_left / scaled_s` of the work is done
    before. Why: a GPU server's steps are ~5 ms; behind a 64-client burst's event loop (the
    GIL) the step in progress ran ~10x its prediction, the replay scaled so put library
    requests at 2.9-8.1 s, and 3-26 of 32 were refused whose admitted peers had their first
    token in 0.2-0.7 s (session 23, device calls 6-10). Without a backlog (`storm_left` 0),
    or a replay that ends within it, the scaled replay stands. `AdmissionController
    .storm_bound` (`bound_by_default`: on for a GPU engine)."""
    if storm_left <= 0 or scaled_s <= unscaled_s or scaled_s <= storm_left:
        return scaled_s
    return storm_left + unscaled_s * (1.0 - storm_left / scaled_s)


def bound_by_default(engine: Any) -> bool:
    """Whether `AdmissionController.storm_bound` is on for `engine`: on when it runs on a
    GPU (`engine.device`), off on the CPU. Why: behind a GPU engine only its Python (the
    kernel launches) shares the GIL with the event loop, and once the loop's backlog is
    through its steps run as the fit says; a CPU engine's compute shares the cores with
    the loop and the clients for the whole burst. Measured (docs/admission.md, session
    24): GPU, 4 servers bounded scored 0.96-1.00 within 2x in every burst (first 64-client
    burst 0-1 429s instead of 5-22), 4 unbounded 0.80-1.00; CPU plain bursts bounded 0.89,
    unbounded 0.92-1.00. An engine without `device` counts as a CPU one."""
    device = getattr(engine, "device", None)
    kind = getattr(device, "type", device)  # a torch.device's, or a name
    return kind is not None and not str(kind).startswith("cpu")
