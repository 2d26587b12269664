"""What the streams relayed from the decode instances say of their time per output token
(a mixin of `GlobalScheduler`, scheduler.py): per decode instance the factor of observed
over step-fit time per token (`tpot_factor.py`), raised by a stream whose next tokens are
already late (`live_lag.py`), and the tokens one SSE event carries (counting events made
the factor ~2x, #19)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moska.pd.live_lag import LiveLag
from moska.pd.token_times import WINDOW
from moska.pd.tpot_factor import TpotFactor

if TYPE_CHECKING:
    from moska.pd.scheduler import Instance, Plan

MAX_SLOWDOWN = 30.0  # the cap of every correction: TPOT factors, stage slowdowns (scheduler)
# the decode side may give tokens faster than its step fit says (a fit still holding the
# first, slow steps; on the CPU trace bench, under 0.5x the fit): the TPOT factor follows
# it down to this sanity floor only (a broken fit or a burst of bunched chunks must not
# zero the prediction). It was 0.5, which held every prediction at >= 0.5x the fit and so
# at ~2x what was observed (observed/predicted 0.5 at the median, #19): the one deliberate
# safety margin on TPOT is SLO_MARGIN, not this floor. The stage slowdowns stay >= 1:
# measured (bench trace), letting them go lower admitted bursts the next load spike missed
MIN_TPOT_FACTOR = 0.05
# which of the streams in flight says how late the decode instance is: the median, not the
# latest one (`live_lag.py`)
LATE_STREAMS_QUANTILE = 0.5


class DecodeSpeed:
    late_tokens: LiveLag
    _tpot_factor: dict[str, TpotFactor]
    _events: dict[str, tuple[float, float]]

    def tpot_factor(self, inst: Instance, now: float) -> float:
        """Observed over step-fit time per token on `inst`: what its windows say, or more
        when most streams' next tokens are already later than that (`late_tokens`)."""
        factor = self._tpot_factor.get(inst.name)
        known = 1.0 if factor is None else factor.value(now)
        late = self.late_tokens.ratio(inst.name, now, LATE_STREAMS_QUANTILE)
        return min(MAX_SLOWDOWN, max(known, late))

    def token_event(self, plan: Plan, decode: Instance, step_s: float, now: float) -> None:
        """A token event of `plan`'s stream came from `decode` at `now`; the step fit puts
        the next one `step_s` later. Late against a window of WINDOW events, not one: a
        window ending `gap` from now is at least `gap / (WINDOW · step)` slower than its
        fit, which is what the factor measures; one event's gap is not (a single stall of
        a few steps, when a new request's first step runs, made every next request a
        TPOT 429 at a mean TPOT 0.6x its SLO)."""
        self.late_tokens.start(decode.name, plan.ticket, now, WINDOW * step_s)

    def observe_tpot(self, inst: Instance, observed_s: float, predicted_s: float, now: float):
        """A stream from decode instance `inst` took `observed_s` for tokens the step model
        (uncorrected, at the batch it saw while they came) put at `predicted_s`."""
        factor = self._tpot_factor.setdefault(inst.name, TpotFactor(MIN_TPOT_FACTOR, MAX_SLOWDOWN))
        factor.observe(observed_s, predicted_s, now)

    def tokens_per_event(self, inst: Instance) -> float:
        """Tokens one relayed SSE event of `inst`'s streams carries (1 until a stream with a
        usage count has finished): what turns an event's time into a time per token."""
        tokens, events = self._events.get(inst.name, (0.0, 0.0))
        return tokens / events if events > 0 else 1.0

    def counts_tokens(self, inst: Instance) -> bool:
        """Whether a finished stream of `inst` has told how many tokens an event carries."""
        return inst.name in self._events

    def observe_events(self, inst: Instance, tokens: int, events: int) -> None:
        """A stream from `inst` ended: `tokens` output tokens came in `events` token events
        (both after its first event)."""
        if tokens >= events > 0:
            old_tokens, old_events = self._events.get(inst.name, (0.0, 0.0))
            self._events[inst.name] = (0.9 * old_tokens + tokens, 0.9 * old_events + events)
