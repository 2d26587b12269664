"""The engine step-time model admission predicts with: what a step did (`StepFeatures`)
and a ridge least-squares fit of its seconds over the last steps (`StepModel`)."""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import numpy as np


class StepFeatures(NamedTuple):
    """What one engine loop iteration did (see `feature_vector` for units)."""

    prefill_tokens: int = 0
    library_pairs: int = 0  # sum over library rows of attended library tokens
    num_decode: int = 0
    num_added: int = 0


def feature_vector(f: StepFeatures) -> np.ndarray:
    # Units keep the fit well conditioned: s, s/1K tokens, s/1M pairs, s/100 rows, s/100 adds
    return np.array(
        [1.0, f.prefill_tokens / 1e3, f.library_pairs / 1e6, f.num_decode / 1e2, f.num_added / 1e2]
    )


# Seconds per unit of `feature_vector`, a CPU-sized guess (the tiny model on two cores); the first few
# dozen steps replace it. Erring slow rejects early work rather than admitting misses. Library
# pairs: 1 s per 1M (10 before session 22's batched CPU attention; warm-up fits since:
# 0.23-0.86, so a fresh server no longer predicts a 200-token library prompt at ~4 s).
DEFAULT_PRIOR = (0.01, 0.3, 1.0, 0.5, 0.05)


class StepModel:
    """Ridge least squares over the last `window` (features, seconds) observations,
    coefficients kept non-negative. Not thread-safe (the controller locks)."""

    def __init__(
        self, prior: tuple[float, ...] = DEFAULT_PRIOR, window: int = 256, prior_weight: float = 1.0
    ) -> None:
        if len(prior) != 5 or any(p < 0 for p in prior):
            raise ValueError("the step-time prior needs 5 non-negative coefficients")
        self.prior = np.array(prior, dtype=float)
        self._obs: deque[tuple[np.ndarray, float]] = deque(maxlen=window)
        self._weight = prior_weight
        self._coef = self.prior.copy()
        self._dirty = False

    def observe(self, features: StepFeatures, seconds: float) -> None:
        self._obs.append((feature_vector(features), seconds))
        self._dirty = True

    @property
    def coef(self) -> np.ndarray:
        if self._dirty:
            self._coef = self._fit()
            self._dirty = False
        return self._coef

    def _fit(self) -> np.ndarray:
        # one copy first (C-level, under the GIL): the engine thread appends while another
        # thread (GET /pd/info) reads the fit, and iterating the deque itself raised
        # "deque mutated during iteration" (a 500 that took a P/D decode instance out)
        obs = tuple(self._obs)
        X = np.array([x for x, _ in obs])
        y = np.array([s for _, s in obs])
        # relative errors: in absolute least squares a few multi-second library prefill
        # steps set every coefficient (the prompt-token cost came out 0 in a mixed burst)
        w = 1.0 / np.maximum(y, 0.01)
        X, y = X * w[:, None], y * w
        # ridge toward the prior, scaled so each coefficient's penalty is relative to it
        scale = 1.0 / np.maximum(self.prior, 1e-4) ** 2 * 1e-4
        free = np.ones(5, dtype=bool)
        coef = np.zeros(5)
        for _ in range(5):  # active set: pin negative coefficients at 0 and refit the rest
            idx = np.flatnonzero(free)
            A = X[:, idx].T @ X[:, idx] + self._weight * np.diag(scale[idx])
            b = X[:, idx].T @ y + self._weight * scale[idx] * self.prior[idx]
            sol = np.linalg.solve(A, b)
            if (sol >= 0).all():
                coef[:] = 0.0
                coef[idx] = sol
                return coef
            free[idx[sol < 0]] = False
        return self.prior.copy()

    def step_s(self, f: StepFeatures) -> float:
        return float(feature_vector(f) @ self.coef)
