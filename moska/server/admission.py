"""Early rejection, as in Mooncake: refuse work that would miss its TTFT SLO.

Plain Python, no clock of its own: the engine loop reports each step
(`observe_step`), the HTTP side asks `decide` before it submits a request.

Model of one engine step: `step_s = prefill_tokens / prefill_tps + decode_step_s`
(the decode part only when requests are running). A new request's time to first token is
predicted as the time to prefill every prompt token queued ahead of it plus its own, plus
one decode step per request ahead of it and its own (each step that prefills also
decodes the running batch):

    ttft = (queued_prefill_tokens + prompt_tokens) / prefill_tps
           + (num_waiting + 1) * decode_step_s * (num_running > 0)

Both rates are exponential moving averages of measured steps, starting from a prior.
"""

from __future__ import annotations

import enum
import math
import threading
from dataclasses import dataclass


class Verdict(enum.Enum):
    ACCEPT = "accept"
    QUEUE_FULL = "queue_full"
    SLO = "ttft_slo"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    predicted_ttft_s: float
    retry_after_s: int  # whole seconds a client should wait before retrying; 0 if accepted

    @property
    def accepted(self) -> bool:
        return self.verdict is Verdict.ACCEPT


@dataclass(frozen=True)
class Load:
    """The engine's load as the admission sees it (engine queue + not yet handed over)."""

    num_waiting: int
    num_running: int
    waiting_prefill_tokens: int


class AdmissionController:
    """Predicts TTFT from measured rates and decides accept / reject. Thread-safe."""

    def __init__(
        self,
        ttft_slo: float | None,
        max_queue: int | None,
        *,
        prior_prefill_tps: float = 2000.0,
        prior_decode_step_s: float = 0.02,
        alpha: float = 0.2,
    ) -> None:
        if prior_prefill_tps <= 0 or prior_decode_step_s <= 0:
            raise ValueError("priors must be positive")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.ttft_slo = ttft_slo
        self.max_queue = max_queue
        self.alpha = alpha
        self._prefill_tps = prior_prefill_tps
        self._decode_step_s = prior_decode_step_s
        self._lock = threading.Lock()

    @property
    def prefill_tps(self) -> float:
        return self._prefill_tps

    @property
    def decode_step_s(self) -> float:
        return self._decode_step_s

    def observe_step(
        self, duration_s: float, prefill_tokens: int, num_decode: int, warmup: bool = False
    ) -> None:
        """Fold one measured engine step into the estimates. `prefill_tokens`: prompt
        tokens computed in the step; `num_decode`: requests that decoded a token in it;
        `warmup`: the step paid a one-off cost (a CUDA graph capture) and is not folded in."""
        if warmup or duration_s <= 0 or not math.isfinite(duration_s):
            return
        a = self.alpha
        with self._lock:
            if prefill_tokens <= 0:
                if num_decode > 0:
                    self._decode_step_s += a * (duration_s - self._decode_step_s)
                return
            decode_part = self._decode_step_s if num_decode > 0 else 0.0
            # Never let a step faster than the decode estimate imply an infinite rate.
            prefill_s = max(duration_s - decode_part, 0.25 * duration_s)
            self._prefill_tps += a * (prefill_tokens / prefill_s - self._prefill_tps)

    def predict_ttft(self, prompt_tokens: int, load: Load) -> float:
        with self._lock:
            tps, step_s = self._prefill_tps, self._decode_step_s
        prefill = (load.waiting_prefill_tokens + prompt_tokens) / tps
        decode = (load.num_waiting + 1) * step_s if load.num_running > 0 else step_s
        return prefill + decode

    def decide(self, prompt_tokens: int, load: Load, num_requests: int = 1) -> Decision:
        """Accept or reject `num_requests` requests of `prompt_tokens` each (n > 1 choices
        of one HTTP request are admitted together)."""
        total = prompt_tokens * num_requests
        ttft = self.predict_ttft(total, load)
        if self.max_queue is not None and load.num_waiting + num_requests > self.max_queue:
            # The queue drains at roughly one waiting request per step.
            wait = (load.num_waiting + num_requests - self.max_queue) * self._decode_step_s
            return Decision(Verdict.QUEUE_FULL, ttft, _retry_after(wait + ttft))
        if self.ttft_slo is not None and ttft > self.ttft_slo:
            return Decision(Verdict.SLO, ttft, _retry_after(ttft - self.ttft_slo))
        return Decision(Verdict.ACCEPT, ttft, 0)


def _retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))
