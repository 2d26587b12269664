"""The front end's KVCache-centric global scheduler (Mooncake's Conductor), plain Python.

For each new request it picks the prefill instance with the earliest predicted end of
its stage — the work on its live queue plus the prefill of the tokens it does not already
cache (the global prefix index) plus the transfer — and the decode instance with the
lightest load that still has a seat and the KV for the request *at the time that stage
ends*; it predicts the time to first token (that stage + the first decode step) and the
time per output token (a decode step at the batch it will join) and rejects that request,
before any prefill, when either SLO would be missed or the decode side will be full
(prediction-based early rejection), with the seconds after which a retry should fit.

Step times come from the instances themselves: each one's admission controller fits its
engine steps (`server/step_model.StepModel`, a ridge fit of seconds over prefill tokens and
decode rows), and the front end copies those coefficients from `/pd/info`
(`set_step_coef`). What a stage really takes is learnt from each request as soon as its
stage ends, per instance, as a line in those step-fit seconds (`stage_fit.py`: a fixed
part for the HTTP hops and event loops, a slope for work that runs slower than its fit),
so the queue is counted once (as work, x) and the fixed costs are not multiplied by it
(#19: one ratio of observed over predicted stage, queue included, reached 4-22x on the
2-core CPU bench and rejected whole rounds). What is late now counts before it ends
(`live_lag.py`): a prefill past its predicted stage, a stream whose next tokens are later
than a window of steps. TTFT is admitted on its upper end (the fits' residual spread).

The time per output token is the decode step at the batch the request joins (those
predicted to be decoding there when its prefill ends, late ones included) times a
per-decode factor of observed over predicted token times (`decode_speed.py`, from the
relayed streams, in tokens, not SSE events); after an idle gap, what the decode side was
known to be lately (`tpot_factor.py`), not 1. A request is admitted only when both
predictions are within SLO_MARGIN (TPOT: TPOT_SLO_MARGIN) of their SLOs. What it admits
it never drops: predictions only decide admission and placement.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from moska.pd.decode_speed import MAX_SLOWDOWN, DecodeSpeed
from moska.pd.index import PrefixIndex
from moska.pd.live_lag import LiveLag
from moska.pd.prefill_gate import ServiceTimes
from moska.pd.tpot_factor import TpotFactor
from moska.pd.ttft_model import TtftModel
from moska.server.step_model import DEFAULT_PRIOR, StepFeatures, feature_vector

SLOWDOWN_HALF_LIFE_S = 5.0
# admit only what is predicted to finish within this share of each SLO: predictions are
# means, and a request admitted at the edge would miss about half the time
SLO_MARGIN = 0.9
# TPOT is checked at this share: every request of a decode batch shares its step time, so
# an edge prediction 10-15% low misses for the whole batch at once (CPU bench, rate 15:
# 10 requests of one round at 0.1003-0.109 s per token against a 0.1 s SLO at 0.9)
TPOT_SLO_MARGIN = 0.8


@dataclass(frozen=True)
class SLO:
    ttft_s: float | None = None
    tpot_s: float | None = None

    def __post_init__(self) -> None:
        for name, v in (("--ttft-slo", self.ttft_s), ("--tpot-slo", self.tpot_s)):
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive seconds (or none)")


@dataclass
class Instance:
    """One instance as the front end sees it."""

    name: str
    url: str
    role: str  # prefill | decode | both
    rank: int | None
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_batched_tokens: int = 2048  # an engine step's token budget (chunked prefill)
    alive: bool = True
    step_coef: np.ndarray = field(default_factory=lambda: np.array(DEFAULT_PRIOR))
    prefills: dict[int, list[float]] = field(default_factory=dict)  # ticket -> [pred s, start]
    active: dict[int, list[float]] = field(default_factory=dict)  # ticket -> [blocks, end_at]
    decoding: int = 0  # streams the front end is relaying from it now (decode)

    def queue_s(self, now: float) -> float:
        """Predicted seconds of prefill ahead of a new request. One not started yet (NaN:
        held by the front end's gate, `prefill_gate.py`) counts its whole prediction; one
        past its predicted end is still there: it counts its whole prediction again (a host
        slower than the fit must not make the queue look empty)."""
        return sum(
            pred - (now - start) if now - start < pred else pred
            for pred, start in self.prefills.values()
        )

    def load_at(self, t: float, now: float | None = None) -> tuple[int, int]:
        """(requests, KV blocks) still decoding at time `t`, as predicted; a request past
        its predicted end (at `now`) that has not finished still counts: it ran slower than
        predicted, and it holds its seat until it ends."""
        now = -math.inf if now is None else now
        left = [b for b, end in self.active.values() if end > t or end <= now]
        return len(left), int(sum(left))


@dataclass(frozen=True)
class RequestInfo:
    hashes: tuple[int, ...]  # index.block_hashes of the prompt
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class Plan:
    ticket: int
    prefill: Instance
    decode: Instance
    cached_blocks: int
    predicted_ttft_s: float
    predicted_tpot_s: float
    predicted_prefill_s: float
    alone: bool = False  # nothing else was prefilling on its prefill instance
    predicted_stage_s: float = 0.0  # admission -> KV at the decode instance
    predicted_first_s: float = 0.0  # decode request sent -> its first token
    batch: int = 0  # the decode batch it joins, itself included, as predicted
    stage_x: float = 0.0  # the step-fit seconds the stage's prediction came from
    first_x: float = 0.0  # and the first token's (`StageFit`: what they learn from)


@dataclass(frozen=True)
class Rejection:
    reason: str  # ttft | tpot | decode_full | no_instance | too_large (never fits: a 400)
    retry_after_s: int
    predicted_ttft_s: float
    predicted_tpot_s: float
    retry_after_ms: int = 0  # the same drain in milliseconds (OpenAI's retry-after-ms)


class GlobalScheduler(DecodeSpeed):
    def __init__(self, instances: list[Instance], slo: SLO, index: PrefixIndex | None = None):
        self.instances = instances
        self.slo = slo
        self.index = index or PrefixIndex()
        for inst in instances:
            if inst.role == "prefill":
                self.index.add_instance(inst.name, inst.num_blocks)
        self.transfer_per_block_s = 0.002  # a guess until the first transfer (`transferred`)
        self._transfers = 0
        # the two TTFT stages per instance, learnt from each request (`ttft_model.py`)
        self.ttft = TtftModel()
        # each decode stream's next token against its predicted time (`live_lag.py`)
        self.late_tokens = LiveLag()
        # a correction (>= 1, fading with SLOWDOWN_HALF_LIFE_S) callers may feed
        # (`observe_stage`); the front end no longer does (#19: a ratio of whole stages, it
        # reached 4-22x on a 2-core host); the fits learn fixed and per-work parts apart
        self._slowdown = {"prefill": (1.0, 0.0), "decode": (1.0, 0.0)}
        # per decode instance: observed time per output token over the step model's, as
        # the front end sees its streams (the engine loop's work between steps, the HTTP
        # hops, a busier host than the fit saw); after an idle gap it is the long-run upper
        # quantile, not 1 (`tpot_factor.py`)
        self._tpot_factor: dict[str, TpotFactor] = {}
        # per decode instance: decaying sums of the tokens and the SSE token events of its
        # finished streams (an event carries a token only when it adds text: `token_times`)
        self._events: dict[str, tuple[float, float]] = {}
        self._tickets = itertools.count(1)
        self.rejections: dict[str, int] = {}
        # prefills in flight per prefill instance at the front end's gate (its width, set
        # by the front end; 0: none, `prefill_gate.py`): one starts when its turn comes and
        # counts its service time; the queue drains `gate_width` at a time
        self.gate_width = 0
        self.service = ServiceTimes()
        # the inputs of the last decision (`plan`), for the front end's decision log
        self.last_inputs: dict[str, float] = {}

    def live(self, role: str) -> list[Instance]:
        return [i for i in self.instances if i.role == role and i.alive]

    # ---- predictions -----------------------------------------------------------------
    def set_step_coef(self, inst: Instance, coef) -> None:
        """The instance's own step-time fit (its admission controller's coefficients)."""
        coef = np.asarray(coef, dtype=float)
        if coef.shape == inst.step_coef.shape and np.isfinite(coef).all():
            inst.step_coef = np.maximum(coef, 0.0)

    def prefill_s(self, uncached_tokens: int, inst: Instance | None = None) -> float:
        """Seconds to prefill `uncached_tokens` alone: its steps under the token budget."""
        inst = inst or self.live("prefill")[0]
        left, total = uncached_tokens, 0.0
        while True:
            chunk = min(left, inst.max_batched_tokens)
            total += float(feature_vector(StepFeatures(prefill_tokens=chunk)) @ inst.step_coef)
            left -= chunk
            if left <= 0:
                return total

    def tpot_s(self, batch: int, inst: Instance | None = None) -> float:
        inst = inst or self.live("decode")[0]
        return float(feature_vector(StepFeatures(num_decode=batch)) @ inst.step_coef)

    def transfer_s(self, blocks: int) -> float:
        return self.transfer_per_block_s * blocks

    # ---- admission -------------------------------------------------------------------
    def plan(
        self, req: RequestInfo, now: float, exclude: frozenset[str] = frozenset()
    ) -> Plan | Rejection:
        self.last_inputs = {}
        prefills = [p for p in self.live("prefill") if p.name not in exclude]
        decodes = [d for d in self.live("decode") if d.name not in exclude]
        if not prefills or not decodes:
            return self._reject("no_instance", 5, 0.0, 0.0)
        bs = prefills[0].block_size
        usable = max(0, (req.prompt_tokens - 1) // bs)

        stages = {p.name: self._stage(p, req, usable, now) for p in prefills}
        prefill = min(prefills, key=lambda p: (stages[p.name][0], -stages[p.name][2]))
        stage, stage_x, cached = stages[prefill.name]
        stage *= self.slowdown("prefill", now)
        ready_at = now + stage  # the KV at the decode instance, as the fit predicts
        need = math.ceil((req.prompt_tokens + req.max_tokens) / bs)

        if all(need > d.num_blocks for d in decodes):
            return self._reject("too_large", 0, 0.0, 0.0)
        best: tuple | None = None
        soonest = math.inf  # when a full decode instance frees enough for this request
        for d in decodes:
            seats, blocks = d.load_at(ready_at, now)
            if seats + 1 <= d.max_num_seqs and blocks + need <= d.num_blocks:
                key = (seats, blocks)
                if best is None or key < best[0]:
                    best = (key, d, seats)
            else:
                soonest = min(soonest, _free_at(d, ready_at, need) - now)
        if best is None:
            retry = soonest if math.isfinite(soonest) else 5.0
            return self._reject("decode_full", retry, stage, 0.0)
        _, decode, seats = best
        # every request on the decode instance shares its steps: the batch it joins sets
        # its own time per token and that of those already there
        tpot = self.tpot_s(seats + 1, decode) * self.tpot_factor(decode, now)
        # the decode instance computes the prompt's tail (under a block) with its first step
        first_x = tpot + self.prefill_s(bs, decode)
        first = self.ttft.first_s(decode.name, first_x, now) * self.slowdown("decode", now)
        ttft = stage + first
        ttft_high = self.ttft.upper(ttft, prefill.name, decode.name, now)
        self.last_inputs = {
            "queue_s": self._queue_s(prefill, now),
            "stage_x": stage_x,
            "first_x": first_x,
            "stage_s": stage,
            "first_s": first,
            "ttft_high_s": ttft_high,
            "seats": seats,
        }
        slo = self.slo.ttft_s
        probe = False  # admitted though TTFT would reject it (`TtftModel.probe`)
        if slo is not None and ttft_high > slo * SLO_MARGIN:
            if not self.ttft.probe(prefill.name, not prefill.prefills, ttft, slo, now,
                                   stage_x + first_x):  # fmt: skip
                return self._reject("ttft", ttft_high - slo * SLO_MARGIN, ttft, tpot)
            probe = True
        if self.slo.tpot_s is not None and tpot > self.slo.tpot_s * TPOT_SLO_MARGIN:
            ends_at = sorted(end for _, end in decode.active.values())
            return self._reject("tpot", (ends_at[0] - now) if ends_at else 1.0, ttft, tpot)
        ticket = next(self._tickets)
        pred = self.prefill_s(req.prompt_tokens - cached * bs, prefill)
        start = math.nan if self.gated else now  # gated: it starts when its turn comes
        prefill.prefills[ticket] = [self._served(prefill, pred, now), start]  # ahead of later
        self.ttft.admitted(prefill.name, ticket, stage, now, probe)
        decode.active[ticket] = [need, now + ttft + req.max_tokens * tpot]
        self.index.record(prefill.name, req.hashes)
        alone = len(prefill.prefills) == 1
        return Plan(
            ticket, prefill, decode, cached, ttft, tpot, pred, alone, stage, first, seats + 1,
            stage_x, first_x,
        )  # fmt: skip

    def _stage(
        self, p: Instance, req: RequestInfo, usable: int, now: float
    ) -> tuple[float, float, int]:
        """(predicted s, its step-fit x, cached blocks) from admission to the KV at the
        decode instance if `p` prefills `req`: the prefill work ahead of it on `p` (its live
        queue), its own uncached prefill and the transfer, through `p`'s stage fit. The
        transfer is of all `usable` blocks, cached ones too (the decode instance has none of
        them), as `transferred` learns its rate; it counted only the uncached (~30% of a
        trace's blocks at its 70% hit rate)."""
        cached = min(self.index.match(p.name, req.hashes), usable)
        own = self._served(p, self.prefill_s(req.prompt_tokens - cached * p.block_size, p), now)
        x = self._queue_s(p, now) + own + self.transfer_s(usable)
        return self.ttft.stage_s(p.name, x, now), x, cached

    gated = property(lambda self: self.gate_width > 0)

    def _queue_s(self, p: Instance, now: float) -> float:  # held ones go `gate_width` at once
        return p.queue_s(now) / max(1, self.gate_width)

    def _served(self, p: Instance, x: float, now: float) -> float:
        """A prefill of step-fit seconds `x` on `p`, at its service time when gated."""
        return self.service.predict(p.name, x, now) if self.gated else x

    def _reject(self, reason: str, retry_s: float, ttft: float, tpot: float) -> Rejection:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        return Rejection(
            reason, max(1, math.ceil(retry_s)), ttft, tpot, max(1, math.ceil(retry_s * 1000))
        )

    # ---- what happened ---------------------------------------------------------------
    def prefill_started(self, plan: Plan, now: float) -> None:
        """`plan`'s prefill left the front end's gate for its instance."""
        entry = plan.prefill.prefills.get(plan.ticket)
        if entry is not None:
            entry[1] = now

    def prefill_computed(self, plan: Plan, now: float) -> None:
        """`plan`'s prefill instance answered: its engine has nothing left of it (the
        transfer's tail may still run; the stage ends at `prefill_done`); the time since
        its turn came is its service time."""
        entry = plan.prefill.prefills.pop(plan.ticket, None)
        if self.gated and entry is not None and math.isfinite(entry[1]):
            self.service.observe(plan.prefill.name, plan.predicted_prefill_s, now - entry[1], now)

    def prefill_done(self, plan: Plan) -> None:
        plan.prefill.prefills.pop(plan.ticket, None)
        self.ttft.done(plan.ticket)

    def observe_prefill(self, plan: Plan, observed_s: float, now: float) -> None:
        """`plan`'s KV reached its decode instance `observed_s` after admission: its
        prefill instance's stage fit learns it at once (the next admission sees it)."""
        self.ttft.observe("prefill", plan.prefill.name, plan.stage_x, observed_s, now)

    def observe_first(self, plan: Plan, decode: Instance, observed_s: float, now: float) -> None:
        """`plan`'s first token came `observed_s` after its decode request was sent."""
        self.ttft.observe("decode", decode.name, plan.first_x, observed_s, now)

    def forget_learnt(self) -> None:
        """Drop the stage lines, TPOT factors and live lags, keeping the instances' step
        fits and the transfer rate: a warm-up's one-off costs (Triton compiles) would stay
        in a stage line and its residual spread into the first measured requests. Each
        stage fit starts again from the fixed cost its warm-up requests paid beyond their
        step fits (a robust median, the one-offs left out: `TtftModel.forgotten`), not
        from 0 (which predicted each stage as the step fits alone, without the
        0.02-0.1 s of HTTP hops and event loops per stage the warm-up had measured on the
        CPU bench)."""
        self.ttft = self.ttft.forgotten()
        self.service = self.service.forgotten()
        self.late_tokens = LiveLag()
        self._tpot_factor.clear()

    def slowdown(self, stage: str, now: float) -> float:
        factor, at = self._slowdown[stage]
        return 1.0 + (factor - 1.0) * 0.5 ** (max(0.0, now - at) / SLOWDOWN_HALF_LIFE_S)

    def observe_stage(self, stage: str, observed_s: float, predicted_s: float, now: float) -> None:
        """An admitted request's stage took `observed_s` where `predicted_s` was predicted
        (with the slowdown then in force)."""
        if not (observed_s > 0 and predicted_s > 0 and math.isfinite(observed_s)):
            return
        current = self.slowdown(stage, now)
        ratio = min(MAX_SLOWDOWN, max(1.0, current * observed_s / predicted_s))
        self._slowdown[stage] = (current + 0.3 * (ratio - current), now)

    def transferred(self, blocks: int, seconds: float) -> None:
        """A transfer of `blocks` ended `seconds` after its prefill did. 0 counts (layer by
        layer over CUDA IPC it all hid behind the prefill on 2 H200s; skipping zeros kept
        the 2 ms-per-block guess, 0.5 s of a 4K-token stage, for ever); the first replaces
        the guess outright."""
        if blocks > 0 and seconds >= 0 and math.isfinite(seconds):
            rate = seconds / blocks
            w = 1.0 if self._transfers == 0 else 0.2
            self.transfer_per_block_s += w * (rate - self.transfer_per_block_s)
            self._transfers += 1

    def moved(self, plan: Plan, decode: Instance, now: float, max_tokens: int) -> None:
        """The request's decode instance changed (a failed transfer was retried elsewhere)."""
        entry = plan.decode.active.pop(plan.ticket, None)
        need = entry[0] if entry else 1
        tpot = self.tpot_s(1 + len(decode.active), decode) * self.tpot_factor(decode, now)
        decode.active[plan.ticket] = [need, now + max_tokens * tpot]

    def finished(self, plan: Plan, decode: Instance) -> None:
        plan.prefill.prefills.pop(plan.ticket, None)
        decode.active.pop(plan.ticket, None)
        self.ttft.done(plan.ticket)
        self.late_tokens.drop(plan.ticket)

    def mark_dead(self, inst: Instance) -> None:
        inst.alive = False
        self.index.drop_instance(inst.name)


def _free_at(d: Instance, t: float, need: int) -> float:
    """When decode instance `d` has a seat and `need` blocks free, as predicted."""
    ends = sorted((end, b) for b, end in d.active.values() if end > t)
    seats, blocks = len(ends), sum(b for _, b in ends)
    for end, b in ends:
        seats, blocks = seats - 1, blocks - b
        if seats + 1 <= d.max_num_seqs and blocks + need <= d.num_blocks:
            return end
    return t
