"""A 429's drain: the predicted time until a request like the rejected one would be
admitted, which `Retry-After` and `retry-after-ms` say.

Why the requests inside the front door count: under a burst most requests are past the
door but not yet decided when the first 429s go out, and admission then admits those that
still fit the SLO. A drain from the engine's load as it was left them out: with half the
requests on a library (`moska bench load`, CPU, SLO 5 s), a library 429 promised 0.1-1 s
where a retry was admitted only after 5-9 s, when the engine had served the burst's
admitted requests and gone idle. So the drain is replayed over the engine's load plus the
requests inside that admission would still admit (`with_door`): those whose first token
can come within what fits the SLO, each like a typical admitted request (how many:
`burst_admits`, admission's decisions on them replayed as the event loop makes them).

Why a request's own prefill is not a share of the drain: once nothing waits ahead, a
retry's first token is its own prefill step, which shares the engine with the decode rows
of the requests ahead until they end; it does not shrink as the retry comes later. The
drain charged the overshoot (`ttft - fits`) as if it did: on CPU (SLO 5 s) a long library
request whose prefill alone fits but not beside the burst's decode rows was promised 4-5 s
and admitted only at ~16 s, when the engine was idle. So after the queue ahead has its
first tokens the drain is the first time its prefill beside the rows still decoding fits
(`shares_fit`), up to the engine being idle.

Why the slowdown factor's fall: every predicted step is scaled by `slowdown`, which under
a burst is high (the event loop answering hundreds of connections shares the cores with
the engine) and falls within a few steps once the burst is answered. At 300 clients (CPU,
SLO 5 s) a 48-token library request's prefill alone was predicted at 4.9-5.5 s under that
factor, above the 4.25 s that fits, so its 429s were promised the idle drain (~11 s), yet
it was admitted at 2.4 s once the factor fell. So a request that fits alone once the
factor is back (the fit unscaled) but not under it now is promised the first step at
which, with the steps from the door's burst answered on observed at the fit
(`FactorFall`), it would be admitted (`factor_falls`); only one that misses even unscaled
waits for an idle engine.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from moska.server.queue_replay import EngineLimits, Load, Prediction, RequestCost
from moska.server.step_model import StepFeatures


class Predict(Protocol):
    """The controller's replay (`AdmissionController.predict`)."""

    def __call__(self, new: RequestCost, load: Load, num_requests: int = ...) -> Prediction: ...


def retry_after(seconds: float) -> int:
    """Whole seconds for the Retry-After header: rounded (the drain estimate is the point,
    ceil would double a one-second drain), at least 1; an endless drain says an hour."""
    if not math.isfinite(seconds):
        return 3600
    return max(1, round(seconds))


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
    (a few ms), not of hundreds.

    The controller passes only the plain share of those inside (`LibraryRequests.share`):
    a library request inside is rejected under a queue (its prefill with its risk misses),
    yet counted as a typical plain one. At 300 and 1,000 clients (CPU, half on a library)
    the door counted 100 (and 89) admitted ahead where admission took 31 (29) and no
    library request, and promised library 429s the idle drain of that queue, 7.9-10.1 s,
    for a real 2.8-3.0 s."""
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


def door_opens_s(
    predict: Predict, typical: RequestCost, load: Load, inside: int, fits: float, gap_s: float
) -> float:
    """When the door lets a retry in (session 17): once the requests inside are down to the
    `door_admits` count that still fits ahead of a one-token request (the door's own test),
    at one decision per `gap_s`; not when the door is empty (`FrontDoor.wait_s`). A drain is
    when a retry *sent* would be admitted, and one sent once the door opens queues inside
    on its own TTFT, which admission counts. On 2 loaded cores plain door 429s promised
    `wait_s` (40 inside x 5 ms = 0.20 s) met own-body retries admitted at 0.10 s. Off by
    default (`AdmissionController.door_open`): on the device's idle cores (session 17, call
    2) 0.43 of 429s came within 2x with it, 0.71 without."""
    if inside <= 0:
        return 0.0
    return max(0, inside - door_admits(predict, typical, load, inside, fits)) * gap_s


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


def drain_s(
    pred: Prediction,
    *,
    fits: float,
    risk: float,
    door_wait_s: float,
    shared_s: Callable[[int], float] | None = None,
    fall: FactorFall | None = None,
) -> float:
    """The drain of a request whose replay (over the load ahead of it, the door's admitted
    requests included) is `pred`. FIFO: arriving `d` later, the same work ahead ends at
    the same time, so its TTFT is `pred.ttft_s - d`; while others wait ahead it must fit
    with `risk` (a library request: admitted once `risk * (ttft - d)` fits). Once the queue
    ahead is served (nothing waits: no risk) its TTFT is its own prefill beside the decode
    rows still running, `shared_s(rows)` (`shares_fit`; without it, the overshoot
    `ttft - fits` as before). A request that cannot fit even alone on an idle engine (a
    library prefill longer than the SLO) is admitted only when the engine is idle: its
    drain is the time until then, unless it fits alone once the slowdown factor has
    fallen back (`fall`: then `factor_falls`). A retry also waits for the requests inside
    the door to be decided (`door_wait_s`)."""
    if pred.alone_s > fits:
        engine = pred.idle_s
        if fall is not None and shared_s is not None:
            engine = factor_falls(pred, fits, risk, shared_s, fall, door_wait_s)
    else:
        engine = first_admit(pred, fits / risk)
        if engine > pred.clear_s:  # the queue ahead is served first: no risk then
            engine = max(pred.clear_s, first_admit(pred, fits))
            if shared_s is not None:
                engine = max(engine, shares_fit(pred, fits, shared_s))
        engine = min(engine, pred.idle_s)
    return max(engine, door_wait_s, 0.0)


def first_admit(pred: Prediction, target: float) -> float:
    """When a retry behind the same queue is first predicted within `target`: FIFO, at
    `d` its TTFT is `pred.ttft_s - d`, but one arriving during a step is predicted at
    least a quarter of that step still to run (`queue_replay.replay`'s step in progress),
    so if `ttft_s - target` falls in the last quarter of a step the retry is admitted
    only at that step's end. Why: the drain is when admission would admit, and it stays
    shut through the end of a long step (on CPU a 4,095-token prefill step predicted 4.6 s
    kept plain retries out until it ended, 1.9 s after the door's 429s)."""
    d = pred.ttft_s - target
    for start, end, dt, k in pred.spans:
        if not start < d <= end:
            continue
        i = max(1, math.ceil((d - start) / dt - 1e-9)) if k > 1 and dt > 0 else k
        step_end = min(end, start + i * dt) if k > 1 else end
        if max(step_end - d, 0.25 * dt) + pred.ttft_s - step_end > target + 1e-9:
            return step_end
        break
    return d


@dataclass(frozen=True)
class FactorFall:
    """The controller's slowdown factor (`AdmissionController.slowdown`): moving averages
    of log(observed / predicted step time) and of its squared deviation, their weight per
    step, and how many deviations on the slow side it plans for."""

    log_mean: float
    log_var: float
    alpha: float
    deviations: float

    def ratios(self, steps: int) -> list[float]:
        """The factor after 0..`steps` more steps that run as the fit predicts (log ratio
        0), over the factor now."""
        m, v, out = self.log_mean, self.log_var, []
        for _ in range(steps + 1):
            out.append(math.exp(m + self.deviations * math.sqrt(max(v, 0.0))))
            dev = -m
            m += self.alpha * dev
            v += self.alpha * (dev * dev - v)
        return [x / out[0] for x in out]


def factor_falls(
    pred: Prediction,
    fits: float,
    risk: float,
    shared_s: Callable[[int], float],
    fall: FactorFall,
    start_s: float,
    horizon: int = 64,
) -> float:
    """The drain of a request whose prefill alone (`pred.alone_s`) misses `fits` under the
    slowdown factor now: from `start_s` (the door's burst answered) each engine step runs
    as the fit predicts and moves the factor (`fall.ratios`; every predicted time scales
    with it, the steps' own too); the first step end at which a retry would be admitted:
    while the queue ahead waits (the replay's `clear_steps` steps until `clear_s`, taken
    as even), its TTFT is what is left of `pred.ttft_s` (FIFO) and must fit with `risk`;
    after, its prefill beside the rows still decoding (`shared_s`). The engine's idle
    time (`pred.idle_s`) when the factor at its lowest still misses (an idle engine admits
    anything) or no step before idle brings it under."""
    r = fall.ratios(horizon)
    if pred.alone_s * min(r) > fits:
        return pred.idle_s
    t, k = start_s, 0

    def ratio() -> float:
        return r[min(k, horizon)]

    if pred.clear_steps > 0 and pred.clear_s > start_s:
        dt = pred.clear_s / pred.clear_steps
        for j in range(pred.clear_steps):
            end = (j + 1) * dt
            if end <= start_s:
                continue
            t += min(dt, end - start_s) * ratio()
            k += 1
            if (pred.ttft_s - end) * ratio() * risk <= fits:
                return t
    for (begin, rows), (dt, n) in zip(pred.decoding, pred.decode_steps, strict=False):
        done = 0 if begin >= start_s else min(n, int((start_s - begin) / dt)) if dt > 0 else n
        for _ in range(n - done):
            if shared_s(rows) * ratio() <= fits:
                return t
            if k >= horizon:  # the factor no longer moves: the rest of this span at once
                t += (n - done) * dt * ratio()
                break
            t += dt * ratio()
            k += 1
            done += 1
    return t if pred.decode_steps or pred.clear_steps else max(t, pred.idle_s)


def shares_fit(pred: Prediction, fits: float, shared_s: Callable[[int], float]) -> float:
    """The first time from the queue ahead's last first token (`pred.clear_s`) at which a
    request arriving, with nothing waiting, has its first token within `fits`: its prefill
    beside the requests ahead still decoding then (`pred.decoding`), `shared_s(rows)`
    seconds; while no seq slot is free (inf) it waits for the next one to end first. The
    engine's idle time (`pred.idle_s`) if never before."""
    times = pred.decoding
    for i, (t, rows) in enumerate(times):
        end = times[i + 1][0] if i + 1 < len(times) else math.inf
        if end <= pred.clear_s:
            continue
        start, ttft = max(t, pred.clear_s), shared_s(rows)
        if ttft <= fits:
            return start
        if math.isinf(ttft) and i + 1 < len(times):  # no slot: served after `end`
            at = max(start, end + shared_s(times[i + 1][1]) - fits)
            if at < end:
                return at
    return pred.idle_s


def shared_prefill(
    pred: Prediction,
    prompt_tokens: int,
    step_s: Callable[[StepFeatures], float],
    limits: EngineLimits,
) -> Callable[[int], float]:
    """A request's first token, arriving with nothing waiting while `rows` requests decode
    (`shares_fit`): its prefill alone (`pred.alone_s`) plus what the rows add to each of its
    prefill steps (`step_s`: the predicted step time; they also take budget tokens), after
    half a decode step (the step in progress when it comes, on average); inf while every
    seq slot is taken."""
    alone_s, fixed_s = pred.alone_s, step_s(StepFeatures())
    row_s = (step_s(StepFeatures(num_decode=100)) - fixed_s) / 100

    def shared_s(rows: int) -> float:
        if rows <= 0:
            return alone_s
        if rows >= limits.max_num_seqs:
            return math.inf
        steps = math.ceil(prompt_tokens / max(1, limits.max_num_batched_tokens - rows))
        return alone_s + steps * rows * row_s + 0.5 * (fixed_s + rows * row_s)

    return shared_s


class LibraryRequests:
    """What the door assumes of a library request it rejects unread: the decided library
    requests' typical prompt, max_tokens and library attention, with the prompt from the
    body's size when it is known (`cost`). A library request's wait grows with its prompt
    (prompt tokens x attended library tokens): on CPU a retry of a 48-character one was
    admitted after 1.5-3 s, of a 244-character one after 11-15 s, so one typical drain
    for all of them was 6x too long for the short ones. The size is a least-squares line
    of prompt tokens over body bytes (Content-Length), on moving sums. Also the share of
    the last `window` decided requests that name a library (`share`, `kinds`: the door's
    drains count only the rest of those inside as admitted, `door_admits`; a count, not a
    moving average: with alpha 0.1 it swung 0.3-0.7 over a 50/50 mix). Not thread-safe
    (the controller locks)."""

    def __init__(self, alpha: float = 0.1, window: int = 128) -> None:
        self.alpha = alpha
        self.typical: list[float] | None = None  # prompt, max_tokens, library_attend
        self._sums = [0.0] * 5  # moving averages of 1, bytes, tokens, bytes^2, bytes x tokens
        self.kinds: deque[bool] = deque(maxlen=window)  # each decided request: a library's?
        self.share = 0.0

    def observe(self, cost: RequestCost, body_bytes: int | None) -> None:
        """A request was decided (plain ones move `share` only)."""
        self.kinds.append(bool(cost.library_attend))
        self.share = sum(self.kinds) / len(self.kinds)
        if not cost.library_attend:
            return
        seen = (cost.prompt_tokens, cost.max_tokens, cost.library_attend)
        if self.typical is None:
            self.typical = [float(v) for v in seen]
        for i, v in enumerate(seen):
            self.typical[i] += self.alpha * (v - self.typical[i])
        if body_bytes:
            x, y = float(body_bytes), float(cost.prompt_tokens)
            for i, m in enumerate((1.0, x, y, x * x, x * y)):
                self._sums[i] += self.alpha * (m - self._sums[i])

    def prompt_tokens(self, body_bytes: int) -> int | None:
        """The prompt a library request's body of `body_bytes` holds (None: no sizes seen,
        or all alike)."""
        w, x, y, xx, xy = self._sums
        if w <= 0:
            return None
        mx, my = x / w, y / w
        var = xx / w - mx * mx
        if var <= 1e-6 * max(mx * mx, 1.0):
            return None
        slope = (xy / w - mx * my) / var
        return max(1, round(my + slope * (body_bytes - mx))) if slope > 0 else None

    def cost(self, body_bytes: int | None = None) -> RequestCost | None:
        """The typical decided library request, its prompt from `body_bytes` when that can
        be told (None: no library request decided yet)."""
        if self.typical is None:
            return None
        prompt, max_tokens, attend = (max(1, round(v)) for v in self.typical)
        told = self.prompt_tokens(body_bytes) if body_bytes else None
        if told is not None:
            prompt = max(1, 16 * round(told / 16))  # 16-token steps: few drains to replay
        return RequestCost(prompt, max_tokens, attend)
