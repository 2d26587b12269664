"""Session 18's two door changes for a 429's promise (#15.4), apart from the controller:

1. **Library requests admitted ahead** (`library_admits`). The door's drain counted as
   admitted ahead only the plain share of the requests inside (`burst_admits`), yet on the
   device's CPU bursts 2-6 library requests a burst were admitted into the burst's big
   prefill step (session 18's call 5): library door 429s with 50-180 character prompts were
   promised 0.3-1 s and reopened at 1-2 s, at that step's end. The library requests inside
   are decided interleaved with the plain ones (`LibraryRequests.share`), and the `j`-th is
   admitted when its prediction, with the library requests before it and the plain ones
   decided before it (as many as admitted, at most) ahead, times admission's library risk,
   plus the time inside, fits. Their prefill then counts in library drains and in the
   early door's probe, not in plain drains (`AdmissionController._door_ahead`).
2. **Refused at the door, not after the wait** (`door_probe`). The door asked whether the
   smallest request (one prompt token) would miss the SLO after the requests inside had
   been decided (`FrontDoor.wait_s`). In session 17's bursts 6.4 % of the scored 429s were
   plain requests let through and refused after reading for the time they had waited inside
   (the storm of connections ahead of them, then those inside): a fresh retry got in at
   once, so no promise > 0 was within 2x for them. With `door_early` the door decides on a
   typical admitted request with the wait it will face, the storm still to answer
   (`FrontDoor.storm_s`) included, behind those inside that admission will admit (as the
   drains count them, not all inside as before), so such a request gets its 429 on
   arrival with the door's drain (the storm anchor counts the storm down; a floor of the
   wait over the SLO, tried, promised plain door 429s about 2x too long on 2 CPU cores).
   With all inside counted ahead, on 2 shared CPU cores it refused
   plain requests at 64 clients that the door before let in (11 plain door 429s, all
   promised too long); on 300 clients it scored 0.51 vs 0.39 off, and behind only those
   admitted 0.31 and 0.38 (20 and 26 late plain 429s, where the door before had 0-3: the
   smallest request behind all inside is the stricter test). `door_all` (`--door-early
   all`) is the form the device A/B runs.

Both are `AdmissionController` switches (`door_library`, `door_early`, `door_all`; `moska
bench load --door-early on|all` turns them on), off by default: on session 18's final
device call (`--door-early all`, 2 servers an arm) 0.57 of 429s came within 2x against
0.69 off (library door 429s 0.66 in both, plain door 0.40 vs 0.68, and more plain 429s
decided after reading, 228 vs 136); docs/admission.md.
"""

from __future__ import annotations

import math

from moska.server.queue_replay import Load, RequestCost
from moska.server.retry_drain import Predict, with_door


def library_admits(
    predict: Predict,
    library: RequestCost,
    typical: RequestCost,
    load: Load,
    plain_admitted: int,
    library_inside: int,
    share: float,
    fits: float,
    risk: float = 1.5,
    stall_s: float = 0.0,
) -> int:
    """How many of the `library_inside` library requests (like `library`) inside the door
    admission will admit, on `load`, with `plain_admitted` plain ones (like `typical`)
    admitted among them. `share`: the library share of decided requests, so before the
    `j`-th library decision come about `j (1 - share) / share` plain ones. Those admitted
    are a prefix (each one's queue only grows): bisected."""
    if library_inside <= 0 or share <= 0 or fits <= 0:
        return 0
    plain_per = (1.0 - share) / share

    def admits(j: int) -> bool:  # the j-th (1-based), all library ones before it admitted
        plain = min(plain_admitted, math.ceil((j - 1) * plain_per + plain_per - 1e-9))
        ahead = with_door(with_door(load, typical, plain), library, j - 1)
        return predict(library, ahead).ttft_s * risk + stall_s <= fits

    lo, hi = 0, library_inside
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if admits(mid) else (lo, mid - 1)
    return lo


def door_ahead(
    load: Load,
    typical: RequestCost,
    plain_admitted: int,
    library: RequestCost | None,
    library_admitted: int,
) -> Load:
    """`load` plus the requests inside the door that admission will admit ahead of a
    retry: the plain ones, then the library ones (their prefill)."""
    ahead = with_door(load, typical, plain_admitted)
    if library is not None and library_admitted > 0:
        ahead = with_door(ahead, library, library_admitted)
    return ahead


def door_probe(
    early: bool, typical: RequestCost, lag_s: float, wait_s: float, storm_s: float
) -> tuple[RequestCost, float]:
    """What the door decides on, and the time it has spent in the server when decided:
    the smallest request after the wait for those inside (`early` False, before session
    18), or a typical admitted one after the wait it will face, the storm still to answer
    included (`early`)."""
    if not early:
        return RequestCost(1, 1), lag_s + wait_s
    return typical, lag_s + wait_s + max(0.0, storm_s)
