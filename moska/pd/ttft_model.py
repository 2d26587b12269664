"""The global scheduler's time-to-first-token model (#19): per instance, what each stage
takes as a line in its step-fit seconds (`stage_fit.py`), learnt from each request as its
stage ends; what is late in flight (`live_lag.py`); the upper end admission checks; and the
probe that keeps a run of rejections from lasting for ever.

Two stages: admission -> the KV at the decode instance (the prefill instance's fit; x =
the step-fit seconds of the work on its live queue + its own prefill + the transfer) and
decode request -> first token (the decode instance's fit; x = the corrected time per token
of the batch it joins + the step of the prompt's tail). The queue is counted once, as work
in x, and the fixed costs (HTTP hops, event loops) are not multiplied by it: one ratio of
observed over predicted stage, queue included, reached 4-22x on the 2-core CPU bench and
rejected whole rounds (`GlobalScheduler.slowdown`, no longer fed by the front end).
"""

from __future__ import annotations

import math

from moska.pd.live_lag import LiveLag
from moska.pd.stage_fit import StageFit

MAX_LATE = 30.0  # a prefill this late or later: its instance is taken as this much slower
# TTFT is admitted on its upper end: the mean plus this many of the stage fits' residual
# deviations. On the 2-core CPU bench a stall slows every request in flight at once
# (stages 2-5x their prediction, 0.3-0.8 s late); with one deviation 12 of 53 admitted
# missed TTFT at load ~9, with two the edge of the admitted moves in by ~0.5 s
TTFT_SPREADS = 2.0
# while TTFT rejects everything, one request per PROBE_AFTER_S on an idle prefill instance
# is admitted anyway if its mean prediction is within PROBE_MAX_SLOS of the SLO, or the
# instances' own step fits alone (the stage fits' prior) put it within the SLO (`probe`)
PROBE_AFTER_S = 1.0
PROBE_MAX_SLOS = 2.0
# ... or after this many TTFT SLOs, when that is sooner: on 2 H200s (TTFT SLO 0.3 s) a burst
# after an idle gap (stages 0.21-0.25 s for 0.05-0.13 predicted) taught the line ~0.1 s of
# fixed cost and 0.07 s of spread, and the front end then rejected every request at an idle
# prefill instance (0.32 s predicted at the upper end; 0.04-0.07 s seen at idle) for 1.5-2 s
# at 80-100 req/s, a probe a second unlearning it (#19, session 15)
PROBE_AFTER_SLOS = 1.0
PROBE_BEAT_SLOS = 0.5
# and at once while the instance's last prefill stage came in at or under its prediction
# and within PROBE_BEAT_SLOS of the SLO (a probe that beat a burst-learnt line: the next,
# idle, needs no wait; one that did not restores it). On a virtual clock at 80 req/s a 0.25 s burst then locked out 0.75 s (55
# requests rejected), not 1.95 s (151; the rule of a probe a second: 2.8 s, 224)
# until an instance's prefill line has learnt from this many requests, a probe ignores the
# prediction: the first request on a GPU instance pays one-off costs no step marks
# (Triton compiles at new shapes) and the step fits and the line learnt from it alone
# (2.6 s for a 0.1 s prefill) kept every probe out, the step fits never learning again
PROBE_BLIND_REQUESTS = 2


class TtftModel:
    """The two stages' fits per instance, the prefills in flight, the probes."""

    def __init__(self) -> None:
        self.fits: dict[tuple[str, str], StageFit] = {}  # (stage, instance name) -> fit
        self.late_prefills = LiveLag()  # each prefill against its predicted stage
        self._admitted_at: dict[str, float] = {}  # prefill instance -> its last admission
        # prefill instance -> when its current run of TTFT rejections began (`probe`)
        self._rejecting_since: dict[str, float] = {}
        # prefill instance -> its last stage's (observed s, predicted s), `probe`
        self._last_stage: dict[str, tuple[float, float]] = {}
        # requests admitted though TTFT would reject them (`probe`; one a probe let through
        # and TPOT then rejected is not one: it counted 21 in a 4 s round)
        self.probes = 0

    def forgotten(self) -> TtftModel:
        """A fresh model (no lines, spreads, lags or probes) whose fits start from what
        these paid beyond their step fits (`StageFit.fixed_s`), not from nothing: after a
        warm-up, a stage's fixed cost is known, and its one-off costs are not it."""
        fresh = TtftModel()
        for key, fit in self.fits.items():
            fresh.fits[key] = StageFit(a0=fit.fixed_s(), b0=fit.b0)
        return fresh

    def fit(self, stage: str, name: str) -> StageFit:
        return self.fits.setdefault((stage, name), StageFit())

    def stage_s(self, prefill: str, x: float, now: float) -> float:
        """Admission -> KV at the decode instance on `prefill`, for step-fit seconds `x`; a
        prefill in flight there past its predicted stage makes it that much slower."""
        late = max(1.0, min(MAX_LATE, self.late_prefills.ratio(prefill, now)))
        return self.fit("prefill", prefill).predict(x, now) * late

    def first_s(self, decode: str, x: float, now: float) -> float:
        """Decode request -> first token on `decode`, for step-fit seconds `x`."""
        return self.fit("decode", decode).predict(x, now)

    def upper(self, ttft: float, prefill: str, decode: str, now: float) -> float:
        """`ttft` plus TTFT_SPREADS deviations of both stages' residuals."""
        a, b = self.fit("prefill", prefill).spread(now), self.fit("decode", decode).spread(now)
        return ttft + TTFT_SPREADS * math.hypot(a, b)

    def probe(
        self, prefill: str, idle: bool, ttft: float, slo_s: float, now: float,
        prior_s: float = math.inf,
    ) -> bool:  # fmt: skip
        """Whether to admit a request that TTFT would reject, to learn the host anew: while
        everything is rejected nothing is learnt, and a fit from a slower moment (or an
        instance's step fit from its first, slow steps: 0.39 s for a 200-token prompt)
        rejected every request of a 4-round bench run. One request when `prefill` is idle
        (nothing in flight), has admitted and learnt nothing for PROBE_AFTER_S (or
        PROBE_AFTER_SLOS TTFT SLOs, when sooner), and the
        mean `ttft` is within PROBE_MAX_SLOS of the SLO or `prior_s` (the step fits'
        seconds for it, before any learnt line) within the SLO: a warm-up on a loaded host
        taught the prefill line a slope of 5.6 and 1.4 s fixed, predicting 7 s for prompts
        the step fits put at 1.0 s, above every mean bound, and a run rejected all 36
        requests, probing none. An instance that has learnt from under PROBE_BLIND_REQUESTS
        is probed after PROBE_AFTER_S of TTFT rejections whatever the prediction: with
        none, its step fits are the CPU-sized default prior (0.3 s per 1K prompt tokens),
        ~10x a warmed H200's, and a 2-GPU run rejected its 8 warm-up and 420 measured
        requests at 1.5-2 s predicted for prompts that took 0.15 s, admitting none that
        would have taught the instances better."""
        fit = self.fit("prefill", prefill)
        last = fit.last_at
        since = self._rejecting_since.setdefault(prefill, now)
        moved = since if last is None else last  # learnt, or else began rejecting
        quiet = now - max(moved, self._admitted_at.get(prefill, -math.inf))
        seen, predicted = self._last_stage.get(prefill, (math.inf, 0.0))
        beat = seen <= predicted and seen <= PROBE_BEAT_SLOS * slo_s
        wait = 0.0 if beat else min(PROBE_AFTER_S, PROBE_AFTER_SLOS * slo_s)
        if not idle or quiet < wait:
            return False
        # little learnt yet: the prediction is the step fits' prior (a guess) or a line
        # from the instance's first, one-off-paying request (`PROBE_BLIND_REQUESTS`)
        blind = fit.count < PROBE_BLIND_REQUESTS
        return blind or ttft <= PROBE_MAX_SLOS * slo_s or prior_s <= slo_s

    def admitted(
        self, prefill: str, ticket: int, stage_s: float, now: float, probe: bool = False
    ) -> None:
        self._admitted_at[prefill] = now
        self._rejecting_since.pop(prefill, None)
        self.probes += probe
        self.late_prefills.start(prefill, ticket, now, stage_s)

    def done(self, ticket: int) -> None:
        """The request's prefill stage ended (or the request did)."""
        self.late_prefills.drop(ticket)

    def observe(self, stage: str, name: str, x: float, observed_s: float, now: float) -> None:
        """A request's `stage` on instance `name` took `observed_s` for step-fit seconds
        `x`: that fit learns it at once (the next admission sees it)."""
        fit = self.fit(stage, name)
        if stage == "prefill":
            self._last_stage[name] = (observed_s, fit.predict(x, now))
        fit.observe(x, observed_s, now)
