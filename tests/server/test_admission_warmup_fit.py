"""The step-time fit learns a prompt token's cost apart from a library pair's only from
steps whose plain / library mix differs: `moska bench load` warms up with waves of each
kind apart (`warmup_waves`). Synthetic step traces (a known "hardware", +-30% log-normal
noise as on a shared CPU): milliseconds."""

from __future__ import annotations

import random

import numpy as np

from moska.bench.load import warmup_waves
from moska.server.step_model import DEFAULT_PRIOR, StepFeatures, StepModel, feature_vector

TRUE = np.array([0.01, 0.29, 15.0, 0.25, 0.05])  # about the tiny model on 2 CPU cores
ATTEND = 2048  # library tokens a library row attends to
DECODE_STEPS = 15


def _trace(waves: list[tuple[int, float]], rng: random.Random, alternate: bool = False):
    """(features, seconds) of each wave: one prefill step of all its requests, then their
    decode steps; `alternate`: every other request on the library (the old warm-up)."""
    steps = []
    for n, share in waves:
        lib = [(i % 2 == 1) if alternate else rng.random() < share for i in range(n)]
        prompts = [rng.randint(4, 70) for _ in range(n)]
        on_lib = sum(p for p, x in zip(prompts, lib, strict=True) if x)
        steps.append(StepFeatures(sum(prompts), on_lib * ATTEND, 0, n))
        steps += [StepFeatures(0, sum(lib) * ATTEND, n, 0)] * DECODE_STEPS
    return [(f, float(feature_vector(f) @ TRUE) * float(np.exp(rng.gauss(0, 0.3)))) for f in steps]


def _ratios(trace) -> tuple[float, float]:
    """Fitted over true time of a plain and of a library prefill step of 24 requests."""
    model = StepModel(DEFAULT_PRIOR)
    for f, s in trace:
        model.observe(f, s)
    plain, lib = StepFeatures(900, 0, 0, 24), StepFeatures(900, 900 * ATTEND, 0, 24)
    return tuple(model.step_s(f) / float(feature_vector(f) @ TRUE) for f in (plain, lib))


def test_warmup_waves_are_each_kind_apart():
    assert warmup_waves((2, 8), "demo") == [(2, 0.0), (2, 1.0), (8, 0.0), (8, 1.0)]
    assert warmup_waves((2, 8), None) == [(2, 0.0), (8, 0.0)]


def test_waves_apart_tell_prompt_tokens_from_library_pairs():
    """Over ten noise draws the fit of the waves apart predicts a plain and a library
    prefill step within 1.5x of the truth; the old alternated waves (the same 50/50 mix in
    every step) leave the plain prefill's cost to the noise: off by more than 2x in most
    draws (0.03x to 18x)."""
    apart, alternated = [], []
    for seed in range(10):
        rng = random.Random(seed)
        apart.append(_ratios(_trace(warmup_waves((2, 8, 24), "demo"), rng)))
        rng = random.Random(seed)
        alternated.append(_ratios(_trace([(2, 0.5), (8, 0.5), (24, 0.5)], rng, True)))
    assert all(2 / 3 <= r <= 1.5 for pair in apart for r in pair), apart
    off = [plain for plain, _ in alternated if not 0.5 <= plain <= 2.0]
    assert len(off) >= 5, alternated
