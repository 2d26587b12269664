"""Where a request whose KV transfer failed goes on (Mooncake re-prefills rather than fail).

An admitted request is not dropped for a failed transfer: the first failure re-prefills
(a new transfer from the prefill instance), the second sends the client's request to the
decode instance without KV, and it computes the prompt itself. Both go to the same decode
instance while it lives (a failure on the prefill side says nothing against it), else to
the live decode instance with the fewest requests; the request fails only when none is left.
"""

from __future__ import annotations

import time

from moska.pd.scheduler import GlobalScheduler, Instance, Plan


def next_decode(
    sched: GlobalScheduler, plan: Plan, decode: Instance, max_tokens: int
) -> Instance | None:
    """The decode instance the retry goes to (the scheduler's bookkeeping moved there), or
    None when no decode instance is alive."""
    if decode.alive:
        return decode
    live = sched.live("decode")
    if not live:
        return None
    new = min(live, key=lambda d: (len(d.active), d.name))
    sched.moved(plan, new, time.monotonic(), max_tokens)
    return new
