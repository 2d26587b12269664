"""The front end's dispatch gate per prefill instance: admitted prefills go to the instance
one at a time, in admission order (Mooncake's Conductor owns the prefill queue).

Why: an instance batches every prompt waiting when a step starts, so a prompt admitted
later joined the step of one admitted earlier and both finished when the whole step did.
The scheduler's queue (the predictions of those admitted ahead) was then wrong for all but
the last of a burst: on the 2-core CPU bench at 40 req/s, 6 prompts sent within 60 ms ran
as one 0.9 s step, each predicted 0.1-0.4 s (session 14's "~1 s per request after the
warm-up", #19, session 16), and the stage line learnt a slope of ~5 from them and rejected
the rest of the round. Through the gate a later admission never delays an earlier one, and
a request's stage is the work admitted ahead of it plus its own, as predicted: each
prefill ahead counts at its service time (gate -> answer, `ServiceTimes`), learnt per
instance: a prompt's step-fit seconds leave out its fixed costs (HTTP, tokenizing, the
step's own overhead, the transfer's start), which the gate now pays once per request in
turn (on the loaded 2-core box ~0.25 s for a 0.02 s cached-prefix prefill). What it
costs: one front-end hop between two prefills (a few ms), and no batching of prefills
across requests (on the CPU bench a step's time is linear in its prompts; a 4K-token GPU
prompt fills a step alone).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from moska.pd.stage_fit import StageFit


class PrefillGate:
    """At most `width` prefills at a time through `turn`, first come first served."""

    def __init__(self, width: int = 1) -> None:
        if width < 1:
            raise ValueError("a prefill gate lets at least one prefill through")
        self._sem = asyncio.Semaphore(width)  # FIFO: asyncio wakes its waiters in order
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def turn(self, started: Callable[[], None] | None = None) -> AsyncIterator[None]:
        """Wait for this prefill's turn; `started` is called as it begins."""
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        try:
            if started is not None:
                started()
            yield
        finally:
            self._sem.release()


class ServiceTimes:
    """Per prefill instance, a gated prefill's service time (its turn -> its instance's
    answer) as a line `a + b·x` in its step-fit seconds x (`stage_fit.StageFit`)."""

    def __init__(self, priors: dict[str, float] | None = None) -> None:
        self.fits = {name: StageFit(a0=a0) for name, a0 in (priors or {}).items()}

    def predict(self, name: str, x: float, now: float) -> float:
        fit = self.fits.get(name)
        return x if fit is None else fit.predict(x, now)

    def observe(self, name: str, x: float, seconds: float, now: float) -> None:
        self.fits.setdefault(name, StageFit()).observe(x, seconds, now)

    def forgotten(self) -> ServiceTimes:
        """Fits restarted from the fixed cost learnt (a warm-up's one-offs left out)."""
        return ServiceTimes({name: fit.fixed_s() for name, fit in self.fits.items()})
